"""The HTTP API: training and inference sessions, tenants and keys, encryption at rest, persistence."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from tensafe.server.db import ArtifactBlob, SessionRow, Tenant
from tests.server.conftest import Api, make_service
from tests.serving import batch, cli, session_config

T = "/api/v1/training"


def create_session(api: Api, tenant: str = "alice", **dp: Any) -> str:
    body = {"config": session_config(**dp), "sampling_rate": 0.01, "dataset_size": 400}
    response = api.http.post(T, json=body, headers=api.headers(tenant))
    assert response.status_code == 201, response.text
    session_id: str = response.json()["session_id"]
    return session_id


def step(api: Api, session_id: str, n: int, tenant: str = "alice") -> dict[str, Any]:
    """forward_backward then optim_step; returns the optimizer step's finished future."""
    h = api.headers(tenant)
    data = [d.model_dump() for d in batch(n)]
    fb = api.http.post(f"{T}/{session_id}/forward_backward", json={"data": data}, headers=h)
    assert fb.status_code == 202, fb.text
    opt = api.http.post(f"{T}/{session_id}/optim_step", json={}, headers=h)
    assert opt.status_code == 202, opt.text
    done: dict[str, Any] = api.http.get(f"/api/v1/futures/{opt.json()['future_id']}?wait=20", headers=h).json()
    assert done["status"] in ("completed", "failed")
    return done


def test_a_training_session_steps_samples_and_reports_its_privacy_spend(api: Api) -> None:
    session_id = create_session(api)
    epsilons = []
    for n in range(1, 4):
        done = step(api, session_id, n)
        assert done["status"] == "completed", done
        assert done["result"]["step"] == n
        epsilons.append(done["result"]["metrics"]["epsilon"])
    assert epsilons == sorted(epsilons) and epsilons[0] > 0
    info = api.http.get(f"{T}/{session_id}", headers=api.headers("alice")).json()
    assert info["step"] == 3 and info["privacy"]["epsilon"] == epsilons[-1]
    assert "declared by the caller" in info["privacy"]["sampling"]
    sample = api.http.post(
        f"{T}/{session_id}/sample", json={"prompts": ["record"], "num_samples": 2}, headers=api.headers("alice")
    )
    assert sample.status_code == 200
    assert [len(r["sequences"]) for r in sample.json()["responses"]] == [2]
    listed = api.http.get(T, headers=api.headers("alice")).json()
    assert [s["session_id"] for s in listed] == [session_id]


def test_a_step_past_the_budget_is_refused_and_spends_nothing(api: Api) -> None:
    session_id = create_session(api, target_epsilon=0.6, noise_multiplier=1.0)
    spent = None
    for n in range(1, 20):
        done = step(api, session_id, n)
        if done["status"] == "failed":
            assert done["error"]["error"] == "privacy_budget_exceeded"
            assert done["error"]["retryable"] is False
            break
        spent = done["result"]["metrics"]["epsilon"]
    else:
        pytest.fail("the budget was never reached")
    info = api.http.get(f"{T}/{session_id}", headers=api.headers("alice")).json()
    assert info["privacy"]["epsilon"] == spent and spent <= 0.6
    assert info["step"] == n - 1


def test_save_and_load_state_restore_weights_but_never_lower_the_spend(api: Api) -> None:
    session_id = create_session(api)
    h = api.headers("alice")
    step(api, session_id, 1)
    saved = api.http.post(f"{T}/{session_id}/save_state", json={"name": "one"}, headers=h).json()
    probe = {"prompts": ["record 9"], "sampling_params": {"max_tokens": 6, "temperature": 0.0}}
    at_one = api.http.post(f"{T}/{session_id}/sample", json=probe, headers=h).json()
    for n in (2, 3, 4):
        step(api, session_id, n)
    eps_before = api.http.get(f"{T}/{session_id}", headers=h).json()["privacy"]["epsilon"]
    loaded = api.http.post(f"{T}/{session_id}/load_state", json={"state_id": saved["state_id"]}, headers=h)
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["step"] == 1
    assert loaded.json()["privacy"]["epsilon"] == eps_before > saved["epsilon"]
    assert api.http.post(f"{T}/{session_id}/sample", json=probe, headers=h).json() == at_one


def test_a_repeated_idempotency_key_runs_the_operation_once(api: Api) -> None:
    session_id = create_session(api)
    h = {**api.headers("alice"), "Idempotency-Key": "k-1"}
    data = [d.model_dump() for d in batch(1)]
    first = api.http.post(f"{T}/{session_id}/forward_backward", json={"data": data}, headers=h).json()
    second = api.http.post(f"{T}/{session_id}/forward_backward", json={"data": data}, headers=h).json()
    assert first["future_id"] == second["future_id"]
    opt = api.http.post(f"{T}/{session_id}/optim_step", json={}, headers=api.headers("alice")).json()
    done = api.http.get(f"/api/v1/futures/{opt['future_id']}?wait=20", headers=api.headers("alice")).json()
    assert done["result"]["metrics"]["batch_size"] == 4.0  # one batch of 4 accumulated, not two


def test_requests_without_a_valid_key_get_401(api: Api, tmp_path: Path, database: str | None) -> None:
    assert api.http.get(T).status_code == 401
    assert api.http.get(T).json()["error"] == "unauthorized"
    assert api.http.get(T, headers={"Authorization": "Bearer tsk_nope_nope"}).status_code == 401
    assert api.http.get(T, headers={"Authorization": "Basic abc"}).status_code == 401
    forged = api.keys["alice"][:-4] + "AAAA"
    assert api.http.get(T, headers={"Authorization": f"Bearer {forged}"}).status_code == 401


def test_a_revoked_key_is_refused(tmp_path: Path, database: str | None) -> None:
    from fastapi.testclient import TestClient

    from tensafe.server.app import create_app
    from tests.serving import create_key

    data_dir = tmp_path / "data"
    key = create_key(data_dir, database, "carol")
    listed = json.loads(cli("keys", "list", data_dir=data_dir, database=database).stdout)
    assert [k["tenant"] for k in listed] == ["carol"] and key not in json.dumps(listed)
    service = make_service(data_dir, database)
    try:
        http = TestClient(create_app(service))
        assert http.get(T, headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert cli("keys", "revoke", listed[0]["key_id"], data_dir=data_dir, database=database).returncode == 0
        assert http.get(T, headers={"Authorization": f"Bearer {key}"}).status_code == 401
    finally:
        service.close()


def test_another_tenants_objects_are_indistinguishable_from_absent_ones(api: Api) -> None:
    session_id = create_session(api)
    done = step(api, session_id, 1)
    saved = api.http.post(f"{T}/{session_id}/save_state", json={}, headers=api.headers("alice")).json()
    bob = api.headers("bob")
    probes = [
        ("get", f"{T}/{session_id}", None),
        ("post", f"{T}/{session_id}/optim_step", {}),
        ("post", f"{T}/{session_id}/sample", {"prompts": ["x"]}),
        ("post", f"{T}/{session_id}/save_state", {}),
        ("get", f"/api/v1/futures/{done['future_id']}", None),
        ("get", f"/api/v1/packages/{saved['state_id']}", None),
    ]
    for method, path, body in probes:
        theirs = getattr(api.http, method)(path, headers=bob, **({"json": body} if body is not None else {}))
        absent_path = path.replace(session_id, "0" * 32).replace(done["future_id"], "0" * 32)
        absent_path = absent_path.replace(saved["state_id"], "0" * 32)
        absent = getattr(api.http, method)(absent_path, headers=bob, **({"json": body} if body is not None else {}))
        assert theirs.status_code == absent.status_code == 404, path
        assert theirs.json()["error"] == absent.json()["error"] == "not_found"
    own_session = create_session(api, tenant="bob")
    loaded = api.http.post(f"{T}/{own_session}/load_state", json={"state_id": saved["state_id"]}, headers=bob)
    assert loaded.status_code == 404
    assert api.http.get(T, headers=bob).json()[0]["session_id"] == own_session


def test_artifacts_are_encrypted_at_rest_with_the_tenants_key(api: Api, tmp_path: Path) -> None:
    session_id = create_session(api)
    step(api, session_id, 1)
    api.http.post(f"{T}/{session_id}/save_state", json={}, headers=api.headers("alice"))
    service = api.service
    with service.db() as db:
        alice_tenant = db.execute(select(Tenant.id).where(Tenant.name == "alice")).scalar_one()
        stored = [blob.data for blob in db.execute(select(ArtifactBlob)).scalars()]
    stored += [path.read_bytes() for path in (tmp_path / "data" / "artifacts").rglob("*.bin")]
    assert len(stored) >= 2  # the session's state (in the database) and the saved state
    for blob in stored:
        assert b"tensafe-bigram-state" not in blob and b"adapter" not in blob
    with service.db() as db:
        row = db.get(SessionRow, session_id)
        assert row is not None and row.state_artifact is not None
        state = service.store.read(db, alice_tenant, row.state_artifact, service.tenant_key(db, alice_tenant))
        assert b"tensafe-bigram-state" in state
        from tensafe.errors import UsageError

        with pytest.raises(UsageError, match="failed authentication"):
            service.store.read(db, alice_tenant, row.state_artifact, bytes(32))


def test_a_restarted_service_continues_a_session_from_its_last_step(api: Api, tmp_path: Path) -> None:
    session_id = create_session(api)
    for n in (1, 2):
        step(api, session_id, n)
    h = api.headers("alice")
    probe = {"prompts": ["record 5"], "sampling_params": {"max_tokens": 6, "temperature": 0.0}}
    before = api.http.post(f"{T}/{session_id}/sample", json=probe, headers=h).json()
    eps = api.http.get(f"{T}/{session_id}", headers=h).json()["privacy"]["epsilon"]
    api.service.close()
    from fastapi.testclient import TestClient

    from tensafe.server.app import create_app

    database = api.service.engine.url.render_as_string(hide_password=False)
    restarted = make_service(tmp_path / "data", None if database.startswith("sqlite") else database)
    try:
        http = TestClient(create_app(restarted))
        info = http.get(f"{T}/{session_id}", headers=h).json()
        assert info["step"] == 2 and info["privacy"]["epsilon"] == eps
        assert http.post(f"{T}/{session_id}/sample", json=probe, headers=h).json() == before
        api.http = http
        done = step(api, session_id, 3)
        assert done["result"]["step"] == 3 and done["result"]["metrics"]["epsilon"] > eps
    finally:
        restarted.close()


def test_an_inference_session_serves_the_base_model(api: Api) -> None:
    h = api.headers("alice")
    body = {"config": session_config()}
    created = api.http.post("/api/v1/inference", json=body, headers=h)
    assert created.status_code == 201, created.text
    session_id = created.json()["session_id"]
    out = api.http.post(
        f"/api/v1/inference/{session_id}/generate",
        json={"prompts": ["ab", "cd"], "sampling_params": {"max_tokens": 3}},
        headers=h,
    )
    assert out.status_code == 200
    assert [len(r["sequences"][0]["tokens"]) for r in out.json()["responses"]] == [3, 3]
    generate = {"prompts": ["ab"]}
    theirs = api.http.post(f"/api/v1/inference/{session_id}/generate", json=generate, headers=api.headers("bob"))
    assert theirs.status_code == 404
    assert api.http.get(f"{T}/{session_id}", headers=h).status_code == 200
    assert api.http.post(f"{T}/{session_id}/optim_step", json={}, headers=h).status_code == 404


def test_health_readiness_and_openapi(api: Api) -> None:
    assert api.http.get("/healthz").json() == {"status": "ok"}
    assert api.http.get("/readyz").json() == {"status": "ready"}
    paths = api.http.get("/openapi.json").json()["paths"]
    assert f"{T}/{{session_id}}/forward_backward" in paths and "/api/v1/inference" in paths
    assert "/api/v1/audit/verify" in paths


def test_an_empty_optim_step_is_a_charged_noise_step_under_dp_and_refused_without(api: Api) -> None:
    h = api.headers("alice")
    session_id = create_session(api)
    opt = api.http.post(f"{T}/{session_id}/optim_step", json={}, headers=h).json()
    done = api.http.get(f"/api/v1/futures/{opt['future_id']}?wait=20", headers=h).json()
    assert done["status"] == "completed", done
    assert done["result"]["step"] == 1 and done["result"]["metrics"]["batch_size"] == 0.0
    info = api.http.get(f"{T}/{session_id}", headers=h).json()
    assert info["step"] == 1 and info["privacy"]["steps"] == 1
    assert info["privacy"]["epsilon"] == done["result"]["metrics"]["epsilon"] > 0

    plain = create_session(api, enabled=False)
    opt = api.http.post(f"{T}/{plain}/optim_step", json={}, headers=h).json()
    done = api.http.get(f"/api/v1/futures/{opt['future_id']}?wait=20", headers=h).json()
    assert done["status"] == "failed" and done["error"]["error"] == "invalid_request"
    assert "forward_backward first" in done["error"]["message"]
    assert api.http.get(f"{T}/{plain}", headers=h).json()["step"] == 0


def test_a_session_reports_what_its_certificate_states(api: Api) -> None:
    from tensafe.engine.ledger import CALLER_DUTIES, PRIVACY_UNIT_SESSION, RANDOMNESS_SEEDED

    session_id = create_session(api)
    step(api, session_id, 1)
    privacy = api.http.get(f"{T}/{session_id}", headers=api.headers("alice")).json()["privacy"]
    assert (privacy["accountant"], privacy["mode"], privacy["privacy_unit"]) == ("rdp", "session", PRIVACY_UNIT_SESSION)
    assert (privacy["sampling_rate"], privacy["noise_multiplier"], privacy["max_grad_norm"]) == (0.01, 1.0, 1.0)
    assert privacy["target_epsilon"] == 50.0 and "declared by the caller" in privacy["sampling"]
    assert privacy["randomness"] == RANDOMNESS_SEEDED and privacy["reproducible_noise"] is True
    assert set(CALLER_DUTIES) == set(privacy["caller_duties"]) and privacy["outside_guarantee"]


def test_sessions_of_one_tenant_commit_steps_at_the_same_time(api: Api) -> None:
    """Each step's commit inserts rows referencing the tenant and appends to its one audit chain: on
    PostgreSQL, concurrent commits of one tenant must queue, not deadlock."""
    import threading

    sessions = [create_session(api) for _ in range(3)]
    outcomes: list[str] = []

    def drive(session_id: str) -> None:
        for n in range(1, 7):
            outcomes.append(step(api, session_id, n)["status"])

    threads = [threading.Thread(target=drive, args=(s,)) for s in sessions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes == ["completed"] * 18
    assert api.http.get("/api/v1/audit/verify", headers=api.headers("alice")).json()["ok"] is True
