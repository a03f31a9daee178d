"""What a remote tenant can reach: models by registered name, keys the server holds per tenant, its own uploads.

A tenant never names a file on the server: path-like settings are refused by
the schema, packages are signed and opened with the tenant's own server-held
keys, and an uploaded package or dataset is checked before anything is stored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tensafe.engine.ledger import SAMPLING_BY_SERVER
from tensafe.server.db import ArtifactBlob, ArtifactRow
from tensafe_tgsp import format as tgsp_format
from tensafe_tgsp.keys import keygen
from tests.server.conftest import Api
from tests.server.test_api import create_session, step
from tests.serving import cli, session_config

T = "/api/v1/training"


def check(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body["error"] == code and body["message"]
    return body


@pytest.mark.parametrize(
    ("section", "value", "field"),
    [
        ("model", {"path": "/etc"}, "body.config.model.path"),
        ("tgsp", {"signing_key": "/srv/tensafe/keys/alice.key"}, "body.config.tgsp"),
        ("tgsp", {"recipients": ["/srv/tensafe/keys/alice.pub"]}, "body.config.tgsp"),
        ("tgsp", {"recipient_key": "master.key"}, "body.config.tgsp"),
        ("tgsp", {"trusted_signers": ["/etc/passwd"]}, "body.config.tgsp"),
        ("data", {"path": "/etc/shadow"}, "body.config.data"),
        ("he", {"key_owner_state": "/tmp/x"}, "body.config.he"),
        ("output_dir", "/", "body.config.output_dir"),
        ("run_name", "../../x", "body.config.run_name"),
    ],
)
def test_a_setting_that_names_a_server_file_is_422_naming_it(api: Api, section: str, value: Any, field: str) -> None:
    config = session_config()
    config[section] = {**config.get(section, {}), **value} if isinstance(value, dict) else value
    body = {"config": config, "sampling_rate": 0.1, "dataset_size": 50}
    data = check(api.http.post(T, json=body, headers=api.headers("alice")), 422, "invalid_request")
    assert any(p["field"].startswith(field) for p in data["problems"]), data["problems"]
    inference = check(
        api.http.post("/api/v1/inference", json={"config": config}, headers=api.headers("alice")),
        422,
        "invalid_request",
    )
    assert any(p["field"].startswith(field) for p in inference["problems"])


def test_models_are_named_never_located(api: Api) -> None:
    h = api.headers("alice")
    listed = api.http.get("/api/v1/models", headers=h).json()
    assert listed == [{"name": "embedded", "default": True}]
    config = session_config()
    config["model"] = {"name": "llama-70b"}
    body = check(
        api.http.post(T, json={"config": config, "sampling_rate": 0.1, "dataset_size": 50}, headers=h), 404, "not_found"
    )
    assert "llama-70b" in body["message"]
    config["model"] = {"name": "../etc"}
    check(
        api.http.post(T, json={"config": config, "sampling_rate": 0.1, "dataset_size": 50}, headers=h),
        422,
        "invalid_request",
    )


def test_serve_refuses_a_model_that_is_not_a_local_directory(tmp_path: Path) -> None:
    for spec in ("meta-llama/Llama-3-8B", "x=meta-llama/Llama-3-8B", f"x={tmp_path / 'missing'}", "../a=."):
        result = cli("serve", "--model", spec, "--port", "1", data_dir=tmp_path / "data", database=None)
        assert result.returncode == 2, (spec, result.stderr)
        assert "--model" in result.stderr and "Traceback" not in result.stderr


def _export(api: Api, tenant: str, session_id: str, recipients: list[str] = ()) -> tuple[str, bytes]:
    h = api.headers(tenant)
    exported = api.http.post(f"{T}/{session_id}/export_tgsp", json={"recipients": list(recipients)}, headers=h)
    assert exported.status_code == 200, exported.text
    artifact = exported.json()["artifact_id"]
    return artifact, api.http.get(f"/api/v1/packages/{artifact}", headers=h).content


def test_each_tenant_signs_with_its_own_server_held_key(api: Api, tmp_path: Path) -> None:
    keys = {t: api.http.get("/api/v1/keys", headers=api.headers(t)).json() for t in ("alice", "bob")}
    assert keys["alice"] != keys["bob"] and "PRIVATE" not in json.dumps(keys).upper()
    packages = {}
    for tenant in ("alice", "bob"):
        session_id = create_session(api, tenant)
        step(api, session_id, 1, tenant)
        _, packages[tenant] = _export(api, tenant, session_id)
        (tmp_path / f"{tenant}.tgsp").write_bytes(packages[tenant])
        (tmp_path / f"{tenant}.pub").write_text(keys[tenant]["signing_public_key"])
        tgsp_format.verify(tmp_path / f"{tenant}.tgsp", [tmp_path / f"{tenant}.pub"])
    # Bob's package does not verify as Alice's.
    with pytest.raises(Exception, match="trusted"):
        tgsp_format.verify(tmp_path / "bob.tgsp", [tmp_path / "alice.pub"])


def test_a_tenant_cannot_open_or_serve_another_tenants_package(api: Api) -> None:
    session_id = create_session(api, "alice")
    step(api, session_id, 1, "alice")
    artifact, package = _export(api, "alice", session_id)
    bob = api.headers("bob")
    check(api.http.post("/api/v1/inference", json={"adapter_artifact_id": artifact}, headers=bob), 404, "not_found")
    check(api.http.get(f"/api/v1/packages/{artifact}", headers=bob), 404, "not_found")
    # Uploaded by Bob, Alice's package is refused: Bob does not trust Alice's signer, and cannot decrypt it.
    refused = check(api.http.post("/api/v1/packages", content=package, headers=bob), 400, "invalid_request")
    assert "refused" in refused["message"]


def test_an_uploaded_package_serves_after_it_verifies(api: Api, tmp_path: Path) -> None:
    alice = api.headers("alice")
    session_id = create_session(api, "alice")
    step(api, session_id, 1, "alice")
    _, package = _export(api, "alice", session_id)
    greedy = {"prompts": ["record 1"], "sampling_params": {"max_tokens": 8, "temperature": 0.0}}
    trained = api.http.post(f"{T}/{session_id}/sample", json=greedy, headers=alice).json()
    uploaded = api.http.post("/api/v1/packages?name=mine", content=package, headers=alice)
    assert uploaded.status_code == 201, uploaded.text
    created = api.http.post(
        "/api/v1/inference",
        json={"config": session_config(), "adapter_artifact_id": uploaded.json()["artifact_id"]},
        headers=alice,
    )
    assert created.status_code == 201, created.text
    served = api.http.post(f"/api/v1/inference/{created.json()['session_id']}/generate", json=greedy, headers=alice)
    assert served.json() == trained


def test_a_package_from_an_untrusted_signer_is_refused_and_nothing_is_stored(api: Api, tmp_path: Path) -> None:
    alice = api.headers("alice")
    recipient = tmp_path / "alice-recipient.pub"
    recipient.write_text(api.http.get("/api/v1/keys", headers=alice).json()["recipient_public_key"])
    mallory = keygen(tmp_path / "keys", "mallory")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    tgsp_format.pack(
        adapter, tmp_path / "m.tgsp", signing_key=mallory["signing_key"], recipients=[recipient], base_model="x"
    )
    with api.service.db() as db:
        before = db.query(ArtifactRow).count()
    body = check(
        api.http.post("/api/v1/packages", content=(tmp_path / "m.tgsp").read_bytes(), headers=alice),
        400,
        "invalid_request",
    )
    assert "refused" in body["message"] and str(api.service.data_dir) not in body["message"]
    check(api.http.post("/api/v1/packages", content=b"not a package", headers=alice), 400, "invalid_request")
    check(api.http.post("/api/v1/packages", content=b"", headers=alice), 400, "invalid_request")
    with api.service.db() as db:
        assert db.query(ArtifactRow).where(ArtifactRow.kind == "tgsp").count() == 0
        assert db.query(ArtifactRow).count() == before
    assert list((api.service.data_dir / "scratch").iterdir()) == []


def test_an_upload_declared_over_the_limit_is_413_before_it_is_read(api: Api) -> None:
    headers = {**api.headers("alice"), "Content-Length": str(2 * 1024**3)}
    for path in ("/api/v1/packages", "/api/v1/datasets"):
        response = api.http.post(path, content=b"x", headers=headers)
        assert response.status_code == 413, response.text


RECORDS = [{"prompt": f"secret question {i}?", "completion": f" confidential answer {i}"} for i in range(40)]


def _upload_dataset(api: Api, tenant: str = "alice", records: list[dict[str, str]] = RECORDS) -> dict[str, Any]:
    data = "\n".join(json.dumps(r) for r in records).encode()
    response = api.http.post("/api/v1/datasets?name=private.jsonl", content=data, headers=api.headers(tenant))
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def test_a_dataset_session_is_sampled_by_the_server_and_releases_only_step_and_epsilon(api: Api) -> None:
    alice = api.headers("alice")
    dataset = _upload_dataset(api)
    assert dataset["records"] == len(RECORDS)
    config = session_config()
    config["training"]["batch_size"] = 8
    created = api.http.post(T, json={"config": config, "dataset_id": dataset["dataset_id"]}, headers=alice)
    assert created.status_code == 201, created.text
    session_id = created.json()["session_id"]
    for _ in range(3):
        future = api.http.post(f"{T}/{session_id}/train_step", json={}, headers=alice).json()
        done = api.http.get(f"/api/v1/futures/{future['future_id']}?wait=20", headers=alice).json()
        assert done["status"] == "completed", done
        assert set(done["result"]["metrics"]) == {"epsilon"}, done["result"]
    info = api.http.get(f"{T}/{session_id}", headers=alice).json()
    privacy = info["privacy"]
    assert info["step"] == 3 and privacy["steps"] == 3
    assert privacy["sampling"] == SAMPLING_BY_SERVER and privacy["caller_duties"] == []
    assert privacy["sampling_rate"] == pytest.approx(8 / len(RECORDS))
    # Batches the caller supplies would void what the certificate says: refused.
    fb = api.http.post(
        f"{T}/{session_id}/forward_backward",
        json={"data": [{"model_input": [1, 2], "loss_fn_inputs": {"target_tokens": [2, 3]}}]},
        headers=alice,
    )
    if fb.status_code == 202:
        done = api.http.get(f"/api/v1/futures/{fb.json()['future_id']}?wait=20", headers=alice).json()
        assert done["status"] == "failed" and "train_step" in done["error"]["message"]
    else:
        assert fb.status_code in (400, 422), fb.text
    # Another tenant cannot train on it.
    check(
        api.http.post(T, json={"config": config, "dataset_id": dataset["dataset_id"]}, headers=api.headers("bob")),
        404,
        "not_found",
    )


def test_an_uploaded_dataset_is_encrypted_at_rest_and_checked_line_by_line(api: Api) -> None:
    _upload_dataset(api)
    with api.service.db() as db:
        stored = b"".join(blob.data for blob in db.query(ArtifactBlob))
    stored += b"".join(p.read_bytes() for p in (api.service.data_dir / "artifacts").rglob("*.bin"))
    assert len(stored) > 1000
    assert b"confidential answer" not in stored and b"secret question" not in stored
    alice = api.headers("alice")
    bad = check(
        api.http.post("/api/v1/datasets", content=b'{"prompt": "a", "completion": "b"}\n{oops\n', headers=alice),
        400,
        "invalid_request",
    )
    assert "dataset:2" in bad["message"] and str(api.service.data_dir) not in bad["message"]
    check(api.http.post("/api/v1/datasets", content=b"\xff\xfe", headers=alice), 400, "invalid_request")
