"""The server's schema migrations (Alembic, shipped in ``tensafe/server/migrations``).

``open_database`` brings every database to the newest revision before the
server uses it. A database made before migrations existed (tables created
directly, no ``alembic_version``) is first recorded at the initial revision,
which is exactly the schema those versions created, then upgraded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from alembic.config import Config
    from sqlalchemy.engine import Connection, Engine

#: The revision whose schema is the one ``create_all`` made before migrations existed.
INITIAL_REVISION = "0001"
SCRIPT_LOCATION = "tensafe.server:migrations"
#: Replicas starting together on one PostgreSQL database migrate one at a time (pg_advisory_xact_lock key);
#: on SQLite the migration holds the database's write lock.
MIGRATION_LOCK = 0x7E45AFE


def model_modules() -> None:
    """Import the modules that define tables on ``Base`` outside ``tensafe.server.db``."""
    import tensafe.server.idempotency  # noqa: F401


def alembic_config(connection: Connection | None = None) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", SCRIPT_LOCATION)
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "the shipped migrations have a single head"
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at; None for one no migration has touched."""
    from alembic.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine) -> None:
    """Bring the database to the newest revision, adopting one made before migrations existed."""
    from tensafe.server import require

    require("alembic")
    from alembic import command
    from sqlalchemy import inspect, text

    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        elif connection.dialect.name == "sqlite":
            # The write lock first: another process migrating meanwhile is waited for (busy_timeout), not raced.
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        tables = set(inspect(connection).get_table_names())
        config = alembic_config(connection)
        if "tenants" in tables and "alembic_version" not in tables:
            command.stamp(config, INITIAL_REVISION)
        command.upgrade(config, "head")
