"""What the server keeps in its database is authenticated: an edit there is refused, never believed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tensafe.errors import OperationFailed
from tensafe.server.app import create_app
from tensafe.server.db import SessionRow
from tests.server.conftest import Api, make_service
from tests.server.test_api import T, create_session, step


@contextmanager
def restarted(api: Api, data_dir: Path, database: str | None) -> Iterator[TestClient]:
    """The same data directory served by a new process's service (nothing cached from before)."""
    api.service.close()
    service = make_service(data_dir, database)
    try:
        with TestClient(create_app(service), raise_server_exceptions=True) as http:
            yield http
    finally:
        service.close()


def _lower_the_spend(meta: dict[str, Any]) -> None:
    """Ten times the noise in the accountant's history, steps unchanged: epsilon falls, the step count agrees."""
    state = meta["privacy"]["accountant_state"]
    state["groups"] = [[q, sigma * 10, count] for q, sigma, count in state["groups"]]
    if meta.get("spent"):  # a session's own record also carries the spend as shown
        meta["spent"]["epsilon"] = meta["spent"]["epsilon"] / 10


def _edit_meta(stored: str) -> str:
    outer = json.loads(stored)
    _lower_the_spend(outer.get("meta", outer))
    return json.dumps(outer)


def test_an_edited_privacy_spend_in_the_database_is_refused_after_a_restart(
    api: Api, tmp_path: Path, database: str | None
) -> None:
    session_id = create_session(api)
    for n in (1, 2, 3):
        step(api, session_id, n)
    h = api.headers("alice")
    told = api.http.get(f"{T}/{session_id}", headers=h).json()["privacy"]["epsilon"]
    with api.service.db() as db:
        row = db.get(SessionRow, session_id)
        assert row is not None
        row.meta = _edit_meta(row.meta)
    with restarted(api, tmp_path / "data", database) as http:
        shown = http.get(f"{T}/{session_id}", headers=h)
        assert shown.status_code == 500 and shown.json()["error"] == "record_tampered", shown.text
        resumed = http.post(f"{T}/{session_id}/optim_step", json={}, headers=h)
        assert resumed.status_code == 500 and resumed.json()["error"] == "record_tampered", resumed.text
        assert "failed authentication" in resumed.json()["message"]
    assert told > 0


def test_an_edited_saved_state_spend_is_refused_on_load(api: Api, tmp_path: Path, database: str | None) -> None:
    from tensafe.server.db import ArtifactRow

    session_id = create_session(api)
    h = api.headers("alice")
    for n in (1, 2, 3):
        step(api, session_id, n)
    saved = api.http.post(f"{T}/{session_id}/save_state", json={}, headers=h).json()
    with api.service.db() as db:
        artifact = db.get(ArtifactRow, saved["state_id"])
        assert artifact is not None
        artifact.meta = _edit_meta(artifact.meta)
    with restarted(api, tmp_path / "data", database) as http:
        loaded = http.post(f"{T}/{session_id}/load_state", json={"state_id": saved["state_id"]}, headers=h)
        assert loaded.status_code == 500 and loaded.json()["error"] == "record_tampered", loaded.text
        info = http.get(f"{T}/{session_id}", headers=h).json()
        assert info["step"] == 3 and info["privacy"]["epsilon"] > 0


def test_an_existing_data_directory_is_adopted_once_at_its_first_start(
    api: Api, tmp_path: Path, database: str | None
) -> None:
    """Records an earlier version wrote in the clear are signed and sealed by the first `serve` start, only then."""
    from tensafe.server.db import FutureRow

    session_id = create_session(api)
    done = step(api, session_id, 1)
    data_dir = tmp_path / "data"
    with api.service.db() as db:
        row = db.get(SessionRow, session_id)
        future = db.get(FutureRow, done["future_id"])
        assert row is not None and future is not None
        row.meta = json.dumps(json.loads(row.meta)["meta"])  # as an earlier version stored them
        future.result = json.dumps(done["result"])
    (data_dir / "audit-head.json").unlink()
    api.service.close()
    upgraded = make_service(data_dir, database)
    try:
        upgraded.recover()
        tenant_id = row.tenant_id
        assert upgraded.info(tenant_id, session_id).step == 1
        assert upgraded.future(tenant_id, done["future_id"]).result == done["result"]
        assert upgraded.chains.verify(tenant_id).ok
        with upgraded.db() as db:
            row = db.get(SessionRow, session_id)
            assert row is not None
            row.meta = json.dumps(json.loads(row.meta)["meta"])  # the same stripping, after adoption
        upgraded.recover()  # the head file exists now: nothing is adopted again
        with pytest.raises(OperationFailed, match="failed authentication"):
            upgraded.info(tenant_id, session_id)
    finally:
        upgraded.close()
