"""The server's tables, and the engine that holds them (SQLite by default, PostgreSQL by URL)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Boolean,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from tensafe.errors import ConfigError

DB_FILE = "tensafe.db"


class Base(DeclarativeBase):
    pass


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    wrapped_key: Mapped[bytes] = mapped_column(LargeBinary)
    created: Mapped[float] = mapped_column(Float, default=time.time)
    #: Head of the tenant's audit chain, updated with every record, so a deleted last row shows.
    audit_seq: Mapped[int] = mapped_column(Integer, default=0)
    audit_head: Mapped[str] = mapped_column(String(64), default="")


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    label: Mapped[str] = mapped_column(String(200), default="")
    created: Mapped[float] = mapped_column(Float, default=time.time)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


class SessionRow(Base):
    __tablename__ = "sessions"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    spec: Mapped[str] = mapped_column(Text)
    step: Mapped[int] = mapped_column(Integer, default=0)
    #: The session metadata (step, privacy spend) matching ``state_artifact``.
    meta: Mapped[str] = mapped_column(Text, default="")
    epsilon: Mapped[float | None] = mapped_column(Float, nullable=True)
    state_artifact: Mapped[str | None] = mapped_column(String(32), nullable=True)
    created: Mapped[float] = mapped_column(Float, default=time.time)


class FutureRow(Base):
    __tablename__ = "futures"
    __table_args__ = (UniqueConstraint("tenant_id", "request_key"),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id"), index=True)
    request_key: Mapped[str | None] = mapped_column(String(64), nullable=True)
    operation: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), index=True)
    result: Mapped[str | None] = mapped_column(Text, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: The session step this operation followed; forward_backward results past the last step die with a crash.
    after_step: Mapped[int] = mapped_column(Integer, default=0)
    created: Mapped[float] = mapped_column(Float, default=time.time)


class ArtifactRow(Base):
    __tablename__ = "artifacts"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(200), default="")
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(Integer)
    meta: Mapped[str] = mapped_column(Text, default="{}")
    created: Mapped[float] = mapped_column(Float, default=time.time)


class ArtifactBlob(Base):
    """An artifact's sealed bytes kept in the database: session states (committed with their step in one
    transaction) and, on a database replicas share, every artifact."""

    __tablename__ = "artifact_blobs"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class SessionLease(Base):
    """Which replica runs a session, until when, under which fencing token.

    A replica runs a session only while it holds the lease; taking a lease
    over (after it expired) increments the token, and every commit of the
    session's state checks the token, so a replica that lost its lease cannot
    write over its successor's steps.
    """

    __tablename__ = "session_leases"
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id"), primary_key=True)
    owner: Mapped[str] = mapped_column(String(32))
    token: Mapped[int] = mapped_column(Integer, default=1)
    expires: Mapped[float] = mapped_column(Float)


class WorkItem(Base):
    """An operation a replica accepted for a session another replica runs: queued until the holder takes it."""

    __tablename__ = "work_items"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    future_id: Mapped[str] = mapped_column(ForeignKey("futures.id"), unique=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id"), index=True)
    operation: Mapped[str] = mapped_column(String(32))
    #: The request, sealed under the tenant's key (it holds the caller's batch).
    request: Mapped[str] = mapped_column(Text)
    taken_by: Mapped[str | None] = mapped_column(String(32), nullable=True)


class AuditRow(Base):
    __tablename__ = "audit_records"
    __table_args__ = (UniqueConstraint("tenant_id", "seq"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    time: Mapped[float] = mapped_column(Float)
    operation: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(64))
    request_hash: Mapped[str] = mapped_column(String(64))
    result_hash: Mapped[str] = mapped_column(String(64))
    epsilon: Mapped[float | None] = mapped_column(Float, nullable=True)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


def database_url(url: str | None, data_dir: Path) -> str:
    """The SQLAlchemy URL: ``url`` as given (``postgresql://`` uses psycopg 3), or SQLite in ``data_dir``."""
    if url is None:
        return f"sqlite:///{data_dir / DB_FILE}"
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL for concurrent readers; FULL sync so a committed step survives a power cut, not just kill -9.
    cursor = dbapi_connection.cursor()
    _wal(cursor)
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _wal(cursor: Any, wait_s: float = 30.0) -> None:
    """Put the database file in WAL mode (it stays so). Switching needs the file to itself and SQLite
    answers "locked" at once rather than waiting, so processes opening a new database together
    (replicas starting at the same time) try again until ``wait_s`` has passed."""
    import sqlite3

    deadline = time.monotonic() + wait_s
    while True:
        try:
            if cursor.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def open_database(url: str, *, migrate: bool = True) -> tuple[Engine, sessionmaker[Any]]:
    """Connect, bring the schema to the newest migration, and return the engine and a session factory.

    With ``migrate=False`` the schema is left as it is (``tensafe db current`` reads it without changing it).
    A database from before migrations existed is adopted (see :mod:`tensafe.server.migrate`). A URL
    SQLAlchemy cannot use, or a database it cannot reach, is a :class:`ConfigError`.
    """
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError

    from tensafe.server import migrate as migrations

    try:
        if url.startswith("sqlite"):
            engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
            event.listen(engine, "connect", _sqlite_pragmas)
        else:
            engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
    except (ArgumentError, NoSuchModuleError, ImportError) as exc:
        raise ConfigError(
            f"database URL not usable ({exc}); give sqlite:///PATH or postgresql://USER:PASSWORD@HOST/DB "
            "(PostgreSQL needs python -m pip install './tensafe-core[postgres]')"
        ) from None
    try:
        if migrate:
            migrations.upgrade(engine)
        else:
            engine.connect().close()
    except OperationalError as exc:
        engine.dispose()
        raise ConfigError(f"cannot reach the database {engine.url!r}: {exc.orig}") from None
    return engine, sessionmaker(engine, expire_on_commit=False)
