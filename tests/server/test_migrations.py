"""Schema migrations (Alembic): a fresh database matches the tables' definitions; an old one is adopted."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from tensafe.server.db import Base, database_url, open_database
from tensafe.server.migrate import INITIAL_REVISION, current_revision, head_revision, model_modules
from tests.serving import cli

MIGRATIONS = Path(__file__).resolve().parents[2] / "tensafe-core/src/tensafe/server/migrations"
#: The tables create_all made before migrations existed (the initial revision's schema).
PRE_MIGRATION_TABLES = ("tenants", "api_keys", "sessions", "futures", "artifacts", "artifact_blobs", "audit_records")


def url_for(tmp_path: Path, database: str | None) -> str:
    return database_url(database, tmp_path)


def test_a_fresh_database_upgraded_to_head_has_exactly_the_tables_of_the_models(
    tmp_path: Path, database: str | None
) -> None:
    model_modules()
    engine, _ = open_database(url_for(tmp_path, database))
    try:
        assert current_revision(engine) == head_revision()
        with engine.connect() as connection:
            differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
        assert differences == [], (
            "the tables in tensafe.server differ from the migrations; add one: see 'Schema migrations' in "
            f"docs/server.md. Differences: {differences}"
        )
    finally:
        engine.dispose()


def test_a_database_made_before_migrations_is_adopted_and_upgraded(tmp_path: Path, database: str | None) -> None:
    url = url_for(tmp_path, database)
    old = create_engine(url)
    Base.metadata.create_all(old, tables=[Base.metadata.tables[name] for name in PRE_MIGRATION_TABLES])
    with old.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO tenants (id, name, wrapped_key, created, audit_seq, audit_head) "
                "VALUES (:i, :n, :k, 0, 0, '')"
            ),
            {"i": "t1", "n": "old tenant", "k": b"k"},
        )
    old.dispose()
    engine, _ = open_database(url)
    try:
        assert current_revision(engine) == head_revision()
        with engine.connect() as connection:
            assert connection.execute(text("SELECT name FROM tenants")).scalar_one() == "old tenant"
        assert "idempotent_creations" in inspect(engine).get_table_names()
    finally:
        engine.dispose()
    assert head_revision() != INITIAL_REVISION  # the adoption stamped 0001 and ran what came after


def test_db_current_and_upgrade_through_the_cli(tmp_path: Path, database: str | None) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    url = database or f"sqlite:///{data_dir / 'tensafe.db'}"
    old = create_engine(database_url(url, data_dir))
    Base.metadata.create_all(old, tables=[Base.metadata.tables[name] for name in PRE_MIGRATION_TABLES])
    old.dispose()
    behind = cli("db", "current", data_dir=data_dir, database=database)
    assert behind.returncode == 1 and "current: none (run tensafe db upgrade)" in behind.stdout, behind.stderr
    upgraded = cli("db", "upgrade", data_dir=data_dir, database=database)
    assert upgraded.returncode == 0 and f"database at revision {head_revision()} (head)" in upgraded.stdout
    current = cli("db", "current", data_dir=data_dir, database=database)
    assert current.returncode == 0 and f"current: {head_revision()}" in current.stdout


def test_db_commands_give_a_clear_error_for_a_bad_database(tmp_path: Path) -> None:
    missing = cli("db", "current", data_dir=tmp_path / "nothing-here", database=None)
    assert missing.returncode == 2 and "no TenSafe server data" in missing.stderr
    assert "Traceback" not in missing.stderr
    bad = cli("db", "upgrade", data_dir=tmp_path, database="nosuchdialect://x")
    assert bad.returncode == 2 and "database URL not usable" in bad.stderr and "Traceback" not in bad.stderr


def test_the_documented_recipe_writes_an_empty_migration_when_nothing_changed(tmp_path: Path) -> None:
    copy = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS, copy, ignore=shutil.ignore_patterns("__pycache__"))
    url = f"sqlite:///{tmp_path / 'schema.db'}"
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}

    def alembic(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "alembic", "-x", f"url={url}", *args],
            cwd=copy,
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )

    assert alembic("upgrade", "head").returncode == 0
    made = alembic("revision", "--autogenerate", "-m", "nothing changed")
    assert made.returncode == 0, made.stderr
    new = [
        p
        for p in (copy / "versions").glob("*.py")
        if p.name not in {q.name for q in (MIGRATIONS / "versions").glob("*.py")}
    ]
    assert len(new) == 1
    source = new[0].read_text()
    assert "op." not in source and f"down_revision: Union[str, Sequence[str], None] = '{head_revision()}'" in source


def test_replicas_starting_together_migrate_one_at_a_time(tmp_path: Path, database: str | None) -> None:
    from concurrent.futures import ThreadPoolExecutor

    url = url_for(tmp_path, database)

    def start() -> str | None:
        engine, _ = open_database(url)
        try:
            return current_revision(engine)
        finally:
            engine.dispose()

    with ThreadPoolExecutor(max_workers=3) as pool:
        revisions = list(pool.map(lambda _: start(), range(3)))
    assert revisions == [head_revision()] * 3
