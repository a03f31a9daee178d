"""Fixtures and helpers shared by tests/server and tests/sdk.

Every database-backed test runs against SQLite and, when
``TENSAFE_TEST_POSTGRES_URL`` names a PostgreSQL database, against PostgreSQL
too (each test starts from empty tables).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tensafe.config import RunConfig, build_config
from tensafe.types import Datum, datum_from_sequence

POSTGRES_ENV = "TENSAFE_TEST_POSTGRES_URL"
DATABASES = ["sqlite"] + (["postgres"] if os.environ.get(POSTGRES_ENV) else [])
ROOT = Path(__file__).resolve().parents[1]


def bigram_config(**dp: Any) -> RunConfig:
    """A seeded DP config on the pure-Python bigram backend (fast and deterministic)."""
    return build_config(
        {
            "backend": "bigram",
            "optimizer": {"learning_rate": 0.05},
            "training": {"batch_size": 4, "seed": 7},
            "dp": {"enabled": True, "noise_multiplier": 1.0, "secure_rng": False, "target_epsilon": 50.0, **dp},
            "sampling": {"max_tokens": 8, "temperature": 0.0},
        },
        environ={},
    )


def session_config(**dp: Any) -> dict[str, Any]:
    """:func:`bigram_config` as a remote session's config (JSON), as the SDK sends it to a server."""
    from tensafe.api import SessionConfig

    return SessionConfig.from_run_config(bigram_config(**dp)).model_dump(mode="json")


def batch(step: int, size: int = 4) -> list[Datum]:
    """A deterministic batch of byte-token sequences (the bigram backend's tokens are UTF-8 bytes)."""
    return [datum_from_sequence(list(f"record {step}-{i}: the colour is blue".encode())) for i in range(size)]


def reset_postgres(url: str) -> None:
    from sqlalchemy import text

    from tensafe.server.db import Base, database_url, open_database
    from tensafe.server.migrate import model_modules

    model_modules()
    engine, _ = open_database(database_url(url, Path(".")))
    Base.metadata.drop_all(engine)
    with engine.begin() as connection:  # the next open_database migrates the empty database from scratch
        connection.execute(text("DROP TABLE IF EXISTS alembic_version"))
    engine.dispose()


@pytest.fixture(params=DATABASES)
def database(request: pytest.FixtureRequest) -> str | None:
    """None for SQLite in the data directory, or an emptied PostgreSQL URL."""
    if request.param == "sqlite":
        return None
    url = os.environ[POSTGRES_ENV]
    reset_postgres(url)
    return url


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cli(*args: str, data_dir: Path, database: str | None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TENSAFE_DATA_DIR": str(data_dir)}
    env.pop("TENSAFE_DATABASE_URL", None)
    if database is not None:
        env["TENSAFE_DATABASE_URL"] = database
    return subprocess.run(
        [sys.executable, "-m", "tensafe.cli.main", *args], capture_output=True, text=True, env=env, timeout=120
    )


def create_key(data_dir: Path, database: str | None, tenant: str) -> str:
    result = cli("keys", "create", tenant, data_dir=data_dir, database=database)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@dataclass
class LiveServer:
    """A ``tensafe serve`` process on loopback."""

    data_dir: Path
    database: str | None
    port: int
    process: subprocess.Popen[bytes] | None = None
    #: Further ``tensafe serve`` options and environment (replicas: a shared master key, a short lease).
    args: tuple[str, ...] = ()
    env: dict[str, str] | None = None

    @property
    def log(self) -> Path:
        return self.data_dir.parent / f"server-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, extra_path: Path | None = None) -> None:
        env = {**os.environ, "TENSAFE_DATA_DIR": str(self.data_dir), **(self.env or {})}
        if self.database is not None:
            env["TENSAFE_DATABASE_URL"] = self.database
        if extra_path is not None:
            env["PYTHONPATH"] = os.pathsep.join([str(extra_path), env.get("PYTHONPATH", "")])
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:  # a file, not a pipe: a full pipe would block the server
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tensafe.cli.main", "serve", "--port", str(self.port), *self.args],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited: {self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise AssertionError("server did not become ready")

    def kill(self) -> None:
        """kill -9: no shutdown handler runs."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def live_server(tmp_path: Path, database: str | None) -> Iterator[LiveServer]:
    server = LiveServer(tmp_path / "server-data", database, free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()
