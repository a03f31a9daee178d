"""What the server writes holds no plaintext of the caller's data, and only its owner can read it."""

from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path

from sqlalchemy import select

from tensafe.server.db import AuditRow, FutureRow
from tests.server.conftest import Api
from tests.server.test_api import T, create_session
from tests.serving import batch, cli


def test_a_forward_pass_result_is_stored_sealed_and_returned_in_clear(api: Api) -> None:
    session_id = create_session(api, enabled=False)
    h = api.headers("alice")
    data = [d.model_dump() for d in batch(1)]
    submitted = api.http.post(f"{T}/{session_id}/forward_backward", json={"data": data}, headers=h).json()
    done = api.http.get(f"/api/v1/futures/{submitted['future_id']}?wait=20", headers=h).json()
    assert done["status"] == "completed" and done["result"]["loss_fn_outputs"]
    with api.service.db() as db:
        stored = db.get(FutureRow, submitted["future_id"])
        assert stored is not None and stored.result is not None
        request = db.execute(select(AuditRow.request_hash).where(AuditRow.operation == "forward_backward")).scalar_one()
    assert "logprobs" not in stored.result
    plain = {"data": data, "loss_fn": "cross_entropy", "loss_fn_config": None}
    unsalted = hashlib.sha256(json.dumps(plain, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert request != unsalted  # a guessed batch cannot be confirmed from the audit row without the key


def _private(path: Path) -> bool:
    return stat.S_IMODE(path.stat().st_mode) & 0o077 == 0


def test_the_data_directory_and_its_files_are_the_owners_alone(api: Api, tmp_path: Path, database: str | None) -> None:
    session_id = create_session(api)
    api.http.post(f"{T}/{session_id}/save_state", json={}, headers=api.headers("alice"))
    data_dir = tmp_path / "data"
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    files = [p for p in data_dir.rglob("*") if p.is_file()]
    expected = {"master.key", "audit-head.json"} | ({"tensafe.db"} if database is None else set())
    assert expected <= {p.name for p in files}
    assert any(p.suffix == ".bin" for p in files) or database is not None  # PostgreSQL keeps artifacts itself
    assert [p for p in files if not _private(p)] == []
    assert [p for p in data_dir.rglob("*") if p.is_dir() and not _private(p)] == []


def test_the_master_key_can_live_outside_the_data_directory(tmp_path: Path, database: str | None) -> None:
    data_dir, key_file = tmp_path / "data", tmp_path / "secrets" / "tensafe.key"
    made = cli("keys", "create", "alice", "--master-key-file", str(key_file), data_dir=data_dir, database=database)
    assert made.returncode == 0, made.stderr
    assert key_file.exists() and _private(key_file) and not (data_dir / "master.key").exists()
    verified = cli("audit", "verify", "--master-key-file", str(key_file), data_dir=data_dir, database=database)
    assert verified.returncode == 0, verified.stdout + verified.stderr
