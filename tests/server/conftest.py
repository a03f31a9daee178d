"""Fixtures for the server tests: a service on a fresh data directory, and an HTTP client for it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tensafe.server.app import create_app
from tensafe.server.auth import create_key
from tensafe.server.service import SessionService
from tensafe.testing import fresh_plugin_manager
from tests.serving import database, live_server  # noqa: F401  (fixtures)


@dataclass
class Api:
    """A test client with one API key per tenant."""

    service: SessionService
    http: TestClient
    keys: dict[str, str]

    def headers(self, tenant: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[tenant]}"}


def make_service(data_dir: Path, url: str | None) -> SessionService:
    return SessionService(data_dir, database=url, plugin_manager=fresh_plugin_manager(autoload=True))


@pytest.fixture
def api(tmp_path: Path, database: str | None) -> Iterator[Api]:  # noqa: F811
    service = make_service(tmp_path / "data", database)
    keys = {}
    with service.db() as db:
        for tenant in ("alice", "bob"):
            keys[tenant] = create_key(db, service.keyring, tenant)[1]
    # raise_server_exceptions: an unhandled error fails the test instead of becoming a 500.
    with TestClient(create_app(service), raise_server_exceptions=True) as http:
        yield Api(service, http, keys)
    service.close()
