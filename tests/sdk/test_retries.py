"""The SDK resends only what is safe to repeat, honours Retry-After, and creates a session once per call."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tensafe.sdk import OperationFailed, TenSafeClient
from tensafe.sdk.transports import HTTPTransport
from tests.mocks.flaky import FlakyTransport
from tests.mocks.retry_after import RetryAfterTransport
from tests.serving import LiveServer, batch, bigram_config, create_key, free_port


def remote(server: LiveServer, **kwargs: Any) -> TenSafeClient:
    return TenSafeClient(server.url, create_key(server.data_dir, server.database, "alice"), **kwargs)


def test_a_create_whose_answer_was_lost_makes_one_session(live_server: LiveServer) -> None:
    key = create_key(live_server.data_dir, live_server.database, "alice")
    transport = FlakyTransport(drop_after=1)  # the server creates the session; its answer never arrives
    with TenSafeClient(live_server.url, key, transport=transport) as client:
        session = client.create_training_session(bigram_config(), sampling_rate=0.01, dataset_size=400)
        transport.drop_after = 1
        inference = client.create_inference_session(bigram_config())
    assert transport.requests.count("POST /api/v1/training") == 2
    assert transport.requests.count("POST /api/v1/inference") == 2
    headers = {"Authorization": f"Bearer {key}"}
    listed = httpx.get(f"{live_server.url}/api/v1/training", headers=headers).json()
    assert [s["session_id"] for s in listed] == [session.session_id]
    assert httpx.get(f"{live_server.url}/api/v1/inference/{inference.session_id}", headers=headers).status_code == 200


def test_a_post_without_an_idempotency_key_is_not_resent_after_a_lost_answer(live_server: LiveServer) -> None:
    transport = FlakyTransport()
    with remote(live_server, transport=transport) as client:
        session = client.create_training_session(bigram_config(), sampling_rate=0.01, dataset_size=400)
        session.forward_backward(batch(1))
        session.optim_step().result(60)
        transport.drop_after = 1
        with pytest.raises(OperationFailed, match="not sent again") as caught:
            session.save_state()
        assert caught.value.retryable is False
    assert transport.requests.count(f"POST /api/v1/training/{session.session_id}/save_state") == 1


def test_retry_after_is_honoured_and_capped(live_server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    real_sleep = time.sleep

    def sleep(seconds: float) -> None:
        # time.sleep is process-wide: other short waits (polls) still sleep; the SDK's long ones are recorded.
        if seconds >= 0.9:
            slept.append(seconds)
        else:
            real_sleep(seconds)

    monkeypatch.setattr("tensafe.sdk.transports.time.sleep", sleep)
    transport = RetryAfterTransport(busy=2, retry_after="1")
    with remote(live_server, transport=transport) as client:
        client.create_training_session(bigram_config(), sampling_rate=0.01, dataset_size=400)
        assert slept == [1.0, 1.0]
        slept.clear()
        transport.busy, transport.retry_after = 1, "3600"
        client.models()
        assert slept == [30.0]  # HTTPTransport(max_retry_after=30.0)


def test_a_refusal_the_server_says_waiting_will_not_cure_is_not_retried() -> None:
    calls: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        return httpx.Response(429, json={"error": "quota_exceeded", "message": "limit 1", "retryable": False})

    transport = HTTPTransport("http://tensafe.invalid", "tsk_a_b", transport=httpx.MockTransport(answer))
    with pytest.raises(OperationFailed, match="limit 1") as caught:
        transport.models()
    assert calls == ["GET"] and caught.value.code == "quota_exceeded"


def test_serve_with_quotas_and_json_logs(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    key = create_key(data_dir, None, "alice")
    port = free_port()
    log = tmp_path / "serve.log"
    command = [sys.executable, "-m", "tensafe.cli.main", "serve", "--port", str(port), "--data-dir", str(data_dir)]
    options = ["--log-format", "json", "--max-sessions", "1", "--max-queued", "0", "--max-upload-bytes", "0"]
    with log.open("wb") as stderr:
        process = subprocess.Popen([*command, *options], stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=1, headers={"X-Request-ID": "ready-probe"}).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline and process.poll() is None, log.read_text()
                time.sleep(0.2)
        with TenSafeClient(url, key) as client:
            client.create_training_session(bigram_config(), sampling_rate=0.01, dataset_size=400)
            with pytest.raises(OperationFailed, match="the server's limit is 1") as caught:
                client.create_training_session(bigram_config(), sampling_rate=0.01, dataset_size=400)
            assert caught.value.code == "quota_exceeded" and not caught.value.retryable
    finally:
        process.terminate()
        process.wait(timeout=30)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    access = [line for line in lines if line["logger"] == "tensafe.server.access"]
    assert any(line["request_id"] == "ready-probe" and line["route"] == "/readyz" for line in access)
    refused = [line for line in access if line["route"] == "/api/v1/training" and line["status"] == 429]
    assert len(refused) == 1 and len(refused[0]["request_id"]) == 32
    assert key not in log.read_text()
