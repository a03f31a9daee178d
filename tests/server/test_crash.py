"""kill -9 the server mid-training and restart it: nothing a client was told is lost or undone."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tensafe.sdk import OperationFailed, TenSafeClient
from tests.mocks.distributions import make_distribution
from tests.mocks.slow_backend import PLUGIN_MODULE, SLOW_BATCH
from tests.serving import LiveServer, batch, bigram_config, create_key


def test_a_killed_server_resumes_at_the_last_committed_step(live_server: LiveServer, tmp_path: Path) -> None:
    plugin_dir = make_distribution(
        tmp_path / "slow-plugin",
        "tensafe-slow",
        "1.0",
        {"slow": "tensafe_slow_plugin"},
        {"tensafe_slow_plugin": PLUGIN_MODULE},
    )
    live_server.stop()
    live_server.start(extra_path=plugin_dir)
    key = create_key(live_server.data_dir, live_server.database, "alice")
    config = bigram_config().model_copy(update={"backend": "slow-bigram"})
    with TenSafeClient(live_server.url, key, max_retries=0) as client:
        session = client.create_training_session(config, sampling_rate=0.01, dataset_size=400)
        told = 0.0
        for n in range(1, 4):
            session.forward_backward(batch(n))
            told = session.optim_step().result(60).metrics["epsilon"]
        finished_fb = session.forward_backward(batch(4))
        finished_fb.result(60)  # its gradients exist only in the server's memory
        running = session.forward_backward(batch(5, size=SLOW_BATCH))
        queued = session.optim_step()
        time.sleep(1.0)
        headers = {"Authorization": f"Bearer {key}"}
        for future in (running, queued):  # accepted, not finished
            status = httpx.get(f"{live_server.url}/api/v1/futures/{future.future_id}", headers=headers).json()
            assert status["status"] == "queued"
        live_server.kill()
        live_server.start(extra_path=plugin_dir)
        for future in (running, queued):
            with pytest.raises(OperationFailed) as caught:
                future.result(60)
            assert caught.value.retryable and caught.value.code == "server_restarted"
        lost = httpx.get(
            f"{live_server.url}/api/v1/futures/{finished_fb.future_id}", headers={"Authorization": f"Bearer {key}"}
        ).json()
        assert lost["status"] == "failed" and lost["error"] == {
            "error": "gradients_lost",
            "message": lost["error"]["message"],
            "retryable": True,
            "details": {},
        }
        info = session.info()
        assert info.step == 3 and info.privacy is not None and info.privacy.epsilon >= told
        assert info.privacy.epsilon == pytest.approx(told, rel=1e-12)
        session.forward_backward(batch(4))
        resumed = session.optim_step().result(60)
        assert resumed.step == 4 and resumed.metrics["epsilon"] > told
    verify = httpx.get(f"{live_server.url}/api/v1/audit/verify", headers={"Authorization": f"Bearer {key}"}).json()
    assert verify["ok"] is True
