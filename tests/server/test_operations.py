"""Operating the server: /metrics, request ids in logs, quotas, Swagger UI offline, idempotent creation."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from tensafe.api import SessionInfo
from tensafe.server.app import create_app
from tensafe.server.auth import create_key
from tensafe.server.db import SessionRow, Tenant
from tensafe.server.idempotency import Creations
from tensafe.server.logs import configure
from tensafe.server.quotas import Quotas
from tests.server.conftest import Api, make_service
from tests.server.test_api import T, create_session, step
from tests.serving import batch, session_config


def tenant_id(api: Api, name: str) -> str:
    with api.service.db() as db:
        return db.execute(select(Tenant.id).where(Tenant.name == name)).scalar_one()


def sample_value(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus' text format."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name} {labels} in:\n{text}")


# -- /metrics ------------------------------------------------------------------


def test_metrics_count_requests_steps_and_epsilon_without_revealing_tenant_data(api: Api) -> None:
    session_id = create_session(api)
    done = step(api, session_id, 1)
    epsilon = done["result"]["metrics"]["epsilon"]
    response = api.http.get("/metrics")  # no API key, like /healthz
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    route = "/api/v1/training/{session_id}/optim_step"
    assert sample_value(text, "tensafe_http_requests_total", method="POST", route=route, status="202") == 1
    assert sample_value(text, "tensafe_http_request_duration_seconds_count", route=route, status="202") == 1
    assert sample_value(text, "tensafe_optimizer_steps_total") == 1
    alice = tenant_id(api, "alice")
    assert sample_value(text, "tensafe_tenant_epsilon_spent", tenant_id=alice) == pytest.approx(epsilon)
    assert sample_value(text, "tensafe_operations", state="queued") == 0
    # Nothing computed from a batch, no tenant name, no session id (paths are labelled by template).
    for leak in ("loss", "batch_size", "alice", session_id):
        assert leak not in text
    unknown = api.http.get("/no/such/path/abc")
    assert unknown.status_code == 404
    assert "/no/such" not in api.http.get("/metrics").text


def test_queued_operations_show_in_metrics(api: Api) -> None:
    session_id = create_session(api)
    from tensafe.api import ForwardBackwardRequest

    request = ForwardBackwardRequest(data=batch(1))
    api.service.submit(tenant_id(api, "alice"), session_id, request, defer=True)  # accepted, not started
    assert sample_value(api.http.get("/metrics").text, "tensafe_operations", state="queued") == 1
    api.service.start_session(session_id)


def test_two_apps_in_one_process_keep_their_own_metrics(tmp_path: Path) -> None:
    service = make_service(tmp_path / "data", None)
    try:
        with TestClient(create_app(service)) as first, TestClient(create_app(service)) as second:
            first.get("/healthz")
            first.get("/healthz")
            second.get("/healthz")
            get = {"method": "GET", "route": "/healthz", "status": "200"}
            assert sample_value(first.get("/metrics").text, "tensafe_http_requests_total", **get) == 2
            assert sample_value(second.get("/metrics").text, "tensafe_http_requests_total", **get) == 1
    finally:
        service.close()


# -- request ids and logs --------------------------------------------------------------


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    stream = io.StringIO()
    configure("json", stream=stream)
    try:
        yield stream
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def test_each_request_has_an_id_in_its_response_and_its_json_log_line(api: Api, json_logs: io.StringIO) -> None:
    session_id = create_session(api)
    given = api.http.get(f"{T}/{session_id}", headers={**api.headers("alice"), "X-Request-ID": "trace-42.a:b"})
    assert given.headers["x-request-id"] == "trace-42.a:b"
    insane = api.http.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces"})
    generated = insane.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    lines = [json.loads(line) for line in json_logs.getvalue().splitlines() if line.startswith("{")]
    by_id = {line.get("request_id"): line for line in lines if line["logger"] == "tensafe.server.access"}
    line = by_id["trace-42.a:b"]
    assert line["route"] == "/api/v1/training/{session_id}" and line["status"] == 200 and line["method"] == "GET"
    assert by_id[generated]["route"] == "/healthz"
    everything = "\n".join(json.dumps(line) for line in lines)
    assert api.keys["alice"] not in everything and "Bearer" not in everything
    assert "sampling_rate" not in everything  # no request body


def test_a_log_line_written_inside_a_request_carries_its_id(api: Api, json_logs: io.StringIO) -> None:
    from tensafe.server.logs import request_id

    seen: list[str] = []

    @api.http.app.get("/test-only/log")  # type: ignore[attr-defined]
    def log_something() -> dict[str, str]:
        logging.getLogger("tensafe.test").warning("inside")
        seen.append(request_id.get())
        return {}

    api.http.get("/test-only/log", headers={"X-Request-ID": "inner-1"})
    lines = [json.loads(line) for line in json_logs.getvalue().splitlines() if line.startswith("{")]
    inside = [line for line in lines if line["message"] == "inside"]
    assert seen == ["inner-1"] and inside[0]["request_id"] == "inner-1"


# -- quotas ----------------------------------------------------------------------


@pytest.fixture
def limited(tmp_path: Path, database: str | None) -> Iterator[Api]:
    service = make_service(tmp_path / "data", database)
    with service.db() as db:
        keys = {tenant: create_key(db, service.keyring, tenant)[1] for tenant in ("alice", "bob")}
    quotas = Quotas(max_sessions=1, max_queued=1, max_upload_bytes=1000)
    with TestClient(create_app(service, quotas=quotas)) as http:
        yield Api(service, http, keys)
    service.close()


def test_a_tenant_past_its_session_quota_gets_429_without_retry_after(limited: Api) -> None:
    create_session(limited)
    body = {"config": session_config(), "sampling_rate": 0.01, "dataset_size": 400}
    refused = limited.http.post(T, json=body, headers=limited.headers("alice"))
    assert refused.status_code == 429
    assert refused.json()["error"] == "quota_exceeded" and refused.json()["retryable"] is False
    assert "holds 1 sessions, the server's limit is 1" in refused.json()["message"]
    assert "retry-after" not in refused.headers
    create_session(limited, "bob")  # per tenant


def test_a_tenant_past_its_queued_quota_gets_429_with_retry_after(limited: Api) -> None:
    from tensafe.api import ForwardBackwardRequest

    session_id = create_session(limited)
    limited.service.submit(tenant_id(limited, "alice"), session_id, ForwardBackwardRequest(data=batch(1)), defer=True)
    data = [d.model_dump() for d in batch(2)]
    refused = limited.http.post(
        f"{T}/{session_id}/forward_backward", json={"data": data}, headers=limited.headers("alice")
    )
    assert refused.status_code == 429 and refused.json()["error"] == "quota_exceeded"
    assert refused.headers["retry-after"] == "2" and refused.json()["retryable"] is True
    limited.service.start_session(session_id)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        accepted = limited.http.post(
            f"{T}/{session_id}/forward_backward", json={"data": data}, headers=limited.headers("alice")
        )
        if accepted.status_code == 202:
            break
        time.sleep(0.1)
    assert accepted.status_code == 202


def test_uploads_past_the_byte_quota_get_413(limited: Api) -> None:
    record = json.dumps({"text": "the colour is blue"}) + "\n"
    h = limited.headers("alice")
    first = limited.http.post("/api/v1/datasets", content=(record * 20).encode(), headers=h)
    assert first.status_code == 201, first.text
    refused = limited.http.post("/api/v1/datasets", content=(record * 20).encode(), headers=h)
    assert refused.status_code == 413 and refused.json()["error"] == "payload_too_large"
    assert (
        limited.http.post("/api/v1/datasets", content=record.encode(), headers=limited.headers("bob")).status_code
        == 201
    )


# -- Swagger UI ------------------------------------------------------------------------------


def test_docs_reference_no_external_host_and_their_assets_load(api: Api) -> None:
    page = api.http.get("/docs")
    assert page.status_code == 200
    html = page.text
    assert not re.search(r"https?://", html), re.findall(r"https?://[^\s\"']+", html)
    assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)
    assert {a.rsplit(".", 1)[-1] for a in assets} >= {"js", "css"}
    for asset in assets:
        loaded = api.http.get(asset)
        assert loaded.status_code == 200 and len(loaded.content) > 1000, asset
    assert "'/openapi.json'" in html or '"/openapi.json"' in html
    assert api.http.get("/openapi.json").json()["info"]["title"] == "TenSafe"


# -- idempotent creation ---------------------------------------------------------------------


def test_a_repeated_idempotency_key_returns_the_first_session(api: Api) -> None:
    body = {"config": session_config(), "sampling_rate": 0.01, "dataset_size": 400}
    h = {**api.headers("alice"), "Idempotency-Key": "create-1"}
    first = api.http.post(T, json=body, headers=h)
    again = api.http.post(T, json=body, headers=h)
    assert first.status_code == again.status_code == 201
    assert first.json()["session_id"] == again.json()["session_id"]
    assert len(api.http.get(T, headers=api.headers("alice")).json()) == 1
    other = api.http.post(T, json={**body, "dataset_size": 800}, headers=h)
    assert other.status_code == 400 and "different request" in other.json()["message"]
    bob = api.http.post(T, json=body, headers={**api.headers("bob"), "Idempotency-Key": "create-1"})
    assert bob.status_code == 201 and bob.json()["session_id"] != first.json()["session_id"]
    inference = {"config": session_config()}
    hi = {**api.headers("alice"), "Idempotency-Key": "inference-1"}
    made = api.http.post("/api/v1/inference", json=inference, headers=hi)
    assert made.status_code == 201, made.text
    assert (
        api.http.post("/api/v1/inference", json=inference, headers=hi).json()["session_id"] == made.json()["session_id"]
    )


def test_a_retry_during_a_slow_creation_waits_for_it_instead_of_creating_another(api: Api) -> None:
    alice = tenant_id(api, "alice")
    made: list[str] = []
    lock = threading.Lock()

    def make() -> SessionInfo:
        time.sleep(1.0)  # a slow model load
        with lock:
            made.append(f"s{len(made)}")
            return SessionInfo(session_id=made[-1], kind="training", created=0.0)

    def existing(session_id: str) -> SessionInfo:
        return SessionInfo(session_id=session_id, kind="training", created=0.0)

    creations = Creations(api.service.db)

    async def both() -> list[SessionInfo]:
        first = creations.create(alice, "slow", "training {}", make, existing)
        second = creations.create(alice, "slow", "training {}", make, existing)
        return list(await asyncio.gather(first, second))

    results = asyncio.run(both())
    assert made == ["s0"] and [r.session_id for r in results] == ["s0", "s0"]

    def failing() -> SessionInfo:
        raise RuntimeError("model load failed")

    with pytest.raises(RuntimeError):
        asyncio.run(creations.create(alice, "fails", "training {}", failing, existing))
    # A failed creation releases its key: the retry runs.
    assert asyncio.run(creations.create(alice, "fails", "training {}", make, existing)).session_id == "s1"


def test_sessions_created_once_per_key_are_counted_once(api: Api) -> None:
    body = {"config": session_config(), "sampling_rate": 0.01, "dataset_size": 400}
    h = {**api.headers("alice"), "Idempotency-Key": "count-1"}
    for _ in range(3):
        assert api.http.post(T, json=body, headers=h).status_code == 201
    with api.service.db() as db:
        assert len(db.execute(select(SessionRow.id)).all()) == 1


def test_a_retry_that_outwaits_a_running_creation_is_told_to_come_back(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tensafe.server import idempotency
    from tensafe.server.quotas import RetryLater

    monkeypatch.setattr(idempotency, "WAIT_S", 0.3)
    alice = tenant_id(api, "alice")
    release = threading.Event()

    def slow() -> SessionInfo:
        release.wait(30)
        return SessionInfo(session_id="first", kind="training", created=0.0)

    def existing(session_id: str) -> SessionInfo:
        return SessionInfo(session_id=session_id, kind="training", created=0.0)

    creations = Creations(api.service.db)

    async def retried_meanwhile() -> RetryLater:
        first = asyncio.ensure_future(creations.create(alice, "k", "training {}", slow, existing))
        await asyncio.sleep(0.1)
        try:
            await creations.create(alice, "k", "training {}", slow, existing)
        except RetryLater as refused:
            return refused
        finally:
            release.set()
            assert (await first).session_id == "first"
        raise AssertionError("the retry did not wait for the first creation")

    refused = asyncio.run(retried_meanwhile())
    assert refused.code == "creation_in_progress" and refused.retry_after == 2
