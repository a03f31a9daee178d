"""The per-tenant audit chain: every state-changing operation is recorded; tampering is detected."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from tensafe.server import audit
from tensafe.server.db import (
    ApiKey,
    ArtifactBlob,
    ArtifactRow,
    AuditRow,
    FutureRow,
    SessionLease,
    SessionRow,
    Tenant,
    WorkItem,
)
from tests.server.conftest import Api
from tests.server.test_api import T, create_session, step
from tests.serving import batch, cli


def chain(api: Api, tenant: str = "alice") -> list[dict[str, object]]:
    records: list[dict[str, object]] = api.http.get("/api/v1/audit", headers=api.headers(tenant)).json()
    return records


def run_operations(api: Api) -> str:
    session_id = create_session(api)
    step(api, session_id, 1)
    step(api, session_id, 2)
    saved = api.http.post(f"{T}/{session_id}/save_state", json={}, headers=api.headers("alice")).json()
    api.http.post(f"{T}/{session_id}/load_state", json={"state_id": saved["state_id"]}, headers=api.headers("alice"))
    return session_id


def test_every_state_changing_operation_is_chained_per_tenant(api: Api) -> None:
    session_id = run_operations(api)
    records = chain(api)
    assert [r["operation"] for r in records] == [
        "training.create",
        "forward_backward",
        "optim_step",
        "forward_backward",
        "optim_step",
        "save_state",
        "load_state",
    ]
    assert [r["seq"] for r in records] == list(range(1, 8))
    assert all(r["subject"] == session_id for r in records)
    steps = [r for r in records if r["operation"] == "optim_step"]
    info = api.http.get(f"{T}/{session_id}", headers=api.headers("alice")).json()
    assert steps[-1]["epsilon"] == info["privacy"]["epsilon"]
    assert len({r["request_hash"] for r in records}) >= 5
    assert chain(api, "bob") == []
    assert api.http.get("/api/v1/audit/verify", headers=api.headers("alice")).json() == {
        "ok": True,
        "records": 7,
        "problems": [],
    }


def _alice(db: Session) -> str:
    tenant_id: str = db.execute(select(Tenant.id).where(Tenant.name == "alice")).scalar_one()
    return tenant_id


def edit(db: Session) -> None:
    db.execute(update(AuditRow).where(AuditRow.tenant_id == _alice(db), AuditRow.seq == 3).values(epsilon=0.001))


def delete_middle(db: Session) -> None:
    db.execute(delete(AuditRow).where(AuditRow.tenant_id == _alice(db), AuditRow.seq == 4))


def delete_last(db: Session) -> None:
    db.execute(delete(AuditRow).where(AuditRow.tenant_id == _alice(db), AuditRow.seq == 7))


def cut_newest(db: Session) -> None:
    """Delete the three newest records and move the head on the tenant row to the record now last."""
    tenant = db.get(Tenant, _alice(db))
    assert tenant is not None
    db.execute(delete(AuditRow).where(AuditRow.tenant_id == tenant.id, AuditRow.seq > 4))
    fourth = db.execute(select(AuditRow).where(AuditRow.tenant_id == tenant.id, AuditRow.seq == 4)).scalar_one()
    tenant.audit_seq, tenant.audit_head = 4, fourth.hash


def reorder(db: Session) -> None:
    rows = db.execute(select(AuditRow).where(AuditRow.tenant_id == _alice(db), AuditRow.seq.in_((2, 3)))).scalars()
    a, b = sorted(rows, key=lambda r: r.seq)
    fields = ("time", "operation", "subject", "request_hash", "result_hash", "epsilon", "prev_hash", "hash")
    values_a = {f: getattr(a, f) for f in fields}
    for f in fields:
        setattr(a, f, getattr(b, f))
        setattr(b, f, values_a[f])


@pytest.mark.parametrize(
    ("tamper", "finding"),
    [
        (edit, "record 3 (optim_step) was altered"),
        (delete_middle, "rows deleted or reordered"),
        (delete_last, "records removed"),
        (reorder, "does not link"),
        (cut_newest, "the head kept outside the database says 7: records removed"),
    ],
    ids=["edited", "deleted", "deleted-last", "reordered", "cut"],
)
def test_audit_verify_detects_tampering(
    api: Api, tmp_path: Path, database: str | None, tamper: Callable[[Session], None], finding: str
) -> None:
    run_operations(api)
    create_session(api, tenant="bob")
    ok = cli("audit", "verify", data_dir=tmp_path / "data", database=database)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "alice: ok (7 records)" in ok.stdout and "bob: ok (1 records)" in ok.stdout
    with api.service.db() as db:
        tamper(db)
    broken = cli("audit", "verify", data_dir=tmp_path / "data", database=database)
    assert broken.returncode == 1
    assert "alice: BROKEN" in broken.stdout and finding in broken.stdout
    assert "bob: ok" in broken.stdout
    verdict = api.http.get("/api/v1/audit/verify", headers=api.headers("alice")).json()
    assert verdict["ok"] is False and any(finding in p for p in verdict["problems"])


def test_the_head_kept_outside_the_database_must_be_present_and_intact(
    api: Api, tmp_path: Path, database: str | None
) -> None:
    run_operations(api)
    head_file = tmp_path / "data" / "audit-head.json"
    kept = head_file.read_text()
    head_file.write_text(kept.replace('"seq": 7', '"seq": 4'))
    altered = cli("audit", "verify", data_dir=tmp_path / "data", database=database)
    assert altered.returncode == 1 and "the head kept outside the database was altered" in altered.stdout
    head_file.unlink()
    missing = cli("audit", "verify", data_dir=tmp_path / "data", database=database)
    assert missing.returncode == 1 and "no head for this tenant outside the database" in missing.stdout


def test_a_tenant_deleted_from_the_database_with_all_its_records_is_reported(
    api: Api, tmp_path: Path, database: str | None
) -> None:
    run_operations(api)
    create_session(api, tenant="bob")
    with api.service.db() as db:
        bob = db.execute(select(Tenant.id).where(Tenant.name == "bob")).scalar_one()
        for table in (AuditRow, WorkItem, FutureRow, ArtifactBlob, ArtifactRow, SessionRow, ApiKey):
            if table is SessionRow:
                db.execute(
                    delete(SessionLease).where(
                        SessionLease.session_id.in_(select(SessionRow.id).where(SessionRow.tenant_id == bob))
                    )
                )
            db.execute(delete(table).where(table.tenant_id == bob))
        db.execute(delete(Tenant).where(Tenant.id == bob))
    verdict = cli("audit", "verify", data_dir=tmp_path / "data", database=database)
    assert verdict.returncode == 1 and "alice: ok" in verdict.stdout
    assert f"tenant {bob}: BROKEN" in verdict.stdout and "no longer has the tenant" in verdict.stdout


def test_a_head_file_one_commit_behind_still_verifies(api: Api, tmp_path: Path, database: str | None) -> None:
    """A crash between the database commit and the head file's update leaves the file behind: not a cut."""
    session_id = run_operations(api)
    head_file = tmp_path / "data" / "audit-head.json"
    before = head_file.read_text()
    step(api, session_id, 3)
    head_file.write_text(before)
    verdict = cli("audit", "verify", data_dir=tmp_path / "data", database=database)
    assert verdict.returncode == 0, verdict.stdout + verdict.stderr
    assert "alice: ok (9 records)" in verdict.stdout


def test_the_chain_cannot_be_rehashed_without_the_master_key(api: Api) -> None:
    """Recomputing an edited row's hash with plain SHA-256 (no master key) does not pass verification."""
    import hashlib

    run_operations(api)
    with api.service.db() as db:
        row = db.execute(select(AuditRow).where(AuditRow.tenant_id == _alice(db), AuditRow.seq == 7)).scalar_one()
        row.epsilon = 0.0
        row.hash = hashlib.sha256(b"forged").hexdigest()
        tenant = db.get(Tenant, row.tenant_id)
        assert tenant is not None
        tenant.audit_head = row.hash
    assert api.http.get("/api/v1/audit/verify", headers=api.headers("alice")).json()["ok"] is False


def _stored_keys(api: Api, session_id: str) -> set[str]:
    """Every key of the session metadata the database holds (its state and saved states)."""
    with api.service.db() as db:
        session = db.get(SessionRow, session_id)
        assert session is not None
        artifacts = db.execute(select(ArtifactRow.meta).where(ArtifactRow.tenant_id == session.tenant_id)).scalars()
        stored = [json.loads(text) for text in (session.meta, *artifacts)]
    keys: set[str] = set()

    def collect(value: object) -> None:
        if isinstance(value, dict):
            keys.update(value)
            value = list(value.values())
        if isinstance(value, list):
            for item in value:
                collect(item)

    collect(stored)
    return keys


def test_under_dp_the_chain_and_session_records_hold_no_batch_statistics(api: Api) -> None:
    session_id = create_session(api)
    h = api.headers("alice")
    data = [d.model_dump() for d in batch(1)]
    for n in (1, 2):
        done = step(api, session_id, n)
        assert "loss" in done["result"]["metrics"]  # the caller gets its own batch's statistics back
    api.http.post(f"{T}/{session_id}/save_state", json={}, headers=h)
    records = chain(api)

    def digest(value: object) -> str:
        return audit.digest(api.service.keyring.audit_key, value)

    steps = [r for r in records if r["operation"] == "optim_step"]
    assert [r["result_hash"] for r in steps] == [digest({"step": 1}), digest({"step": 2})]
    assert all(r["epsilon"] and r["epsilon"] > 0 for r in steps)
    passes = [r for r in records if r["operation"] == "forward_backward"]
    assert all(r["result_hash"] == digest({}) for r in passes)
    plain = {"data": data, "loss_fn": "cross_entropy", "loss_fn_config": None}
    assert passes[0]["request_hash"] != digest(plain) and passes[0]["request_hash"] != passes[1]["request_hash"]
    stored = _stored_keys(api, session_id)
    assert not stored & {"loss", "loss:sum", "batch_size", "metrics", "logprobs"} and "epsilon" in stored


def test_without_dp_the_chain_covers_each_result_as_returned(api: Api) -> None:
    session_id = create_session(api, enabled=False)
    done = step(api, session_id, 1)
    optim = next(r for r in chain(api) if r["operation"] == "optim_step")
    assert optim["result_hash"] == audit.digest(api.service.keyring.audit_key, done["result"])
    assert optim["epsilon"] is None


def test_a_signed_receipt_shows_a_cut_that_rewrote_the_whole_data_directory(
    api: Api, tmp_path: Path, database: str | None
) -> None:
    """Database and head file rolled back together (an old backup restored): only the client's receipt shows it."""
    alice = api.headers("alice")
    session_id = create_session(api)
    step(api, session_id, 1)
    head_file = tmp_path / "data" / "audit-head.json"
    backup = head_file.read_text()
    early = tmp_path / "early.json"
    early.write_text(api.http.get("/api/v1/audit/receipt", headers=alice).text)
    step(api, session_id, 2)
    receipt = api.http.get("/api/v1/audit/receipt", headers=alice).json()
    assert receipt["seq"] == 5 and receipt["tenant_id"] and receipt["signature"]
    late = tmp_path / "late.json"
    late.write_text(json.dumps(receipt))
    with api.service.db() as db:
        tenant = db.get(Tenant, _alice(db))
        assert tenant is not None
        db.execute(delete(AuditRow).where(AuditRow.tenant_id == tenant.id, AuditRow.seq > 3))
        third = db.execute(select(AuditRow).where(AuditRow.tenant_id == tenant.id, AuditRow.seq == 3)).scalar_one()
        tenant.audit_seq, tenant.audit_head = 3, third.hash
    head_file.write_text(backup)
    data_dir = tmp_path / "data"
    assert cli("audit", "verify", data_dir=data_dir, database=database).returncode == 0  # consistent, yet cut
    assert cli("audit", "verify", "--receipt", str(early), data_dir=data_dir, database=database).returncode == 0
    cut = cli("audit", "verify", "--receipt", str(early), "--receipt", str(late), data_dir=data_dir, database=database)
    assert cut.returncode == 1 and "shows record 5, but the chain ends at 3" in cut.stdout
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps({**receipt, "seq": 2}))
    refused = cli("audit", "verify", "--receipt", str(forged), data_dir=data_dir, database=database)
    assert refused.returncode == 1 and "invalid signature" in refused.stdout
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{}")
    bad = cli("audit", "verify", "--receipt", str(garbage), data_dir=data_dir, database=database)
    assert bad.returncode == 2 and "not a TenSafe audit receipt" in bad.stderr and "Traceback" not in bad.stderr


def test_a_receipt_signed_by_another_server_is_refused(api: Api, tmp_path: Path, database: str | None) -> None:
    from tensafe.server.receipts import ReceiptSigner

    create_session(api)
    with api.service.db() as db:
        alice = _alice(db)
    other = ReceiptSigner(b"\x01" * 32).issue(alice, 1, "0" * 64)
    path = tmp_path / "other.json"
    path.write_text(other.model_dump_json())
    verdict = cli("audit", "verify", "--receipt", str(path), data_dir=tmp_path / "data", database=database)
    assert verdict.returncode == 1 and "signed by another key" in verdict.stdout
