"""Alembic's environment for the server's database: the tables of ``tensafe.server.db.Base``.

``open_database`` runs it on its own connection (``config.attributes["connection"]``);
the ``alembic`` command runs it on the URL given with ``-x url=...``.
"""

from __future__ import annotations

from pathlib import Path

from alembic import context
from sqlalchemy import create_engine
from sqlalchemy.engine import Connection

from tensafe.server.db import Base, database_url
from tensafe.server.migrate import model_modules

model_modules()
target_metadata = Base.metadata


def run(connection: Connection) -> None:
    # Batch mode: SQLite cannot ALTER most things, so autogenerate writes copy-and-move operations for it.
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def main() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        run(connection)
        return
    url = context.get_x_argument(as_dictionary=True).get("url") or context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("give the database: alembic -x url=sqlite:////tmp/tensafe-schema.db ...")
    engine = create_engine(database_url(url, Path(".")))
    try:
        with engine.connect() as connection:
            run(connection)
    finally:
        engine.dispose()


main()
