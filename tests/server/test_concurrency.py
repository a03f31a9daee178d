"""tensafe serve under concurrent load: simultaneous creates, many long polls, and what a 404 reveals."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import event

from tensafe.config import build_config
from tensafe.sdk import TenSafeClient
from tensafe.server.waits import MAX_WAITS_PER_TENANT
from tensafe.types import datum_from_sequence
from tests.mocks.distributions import make_distribution
from tests.serving import LiveServer, batch, bigram_config, create_key, session_config

# -- simultaneous creates ----------------------------------------------------------------------

CLIENTS = 8


def _train_or_serve(url: str, key: str, index: int, start: threading.Barrier) -> str:
    """Create a session the moment every client is ready, then use it once; the session's kind."""
    config = build_config({"training": {"batch_size": 2}, "sampling": {"max_tokens": 4}}, environ={})
    with TenSafeClient(url, key, max_retries=0) as client:  # no retries: one 500 fails the test
        start.wait(timeout=60)
        if index % 4 == 3:
            inference = client.create_inference_session(config)
            [response] = inference.generate(["the colour is"])
            assert len(response.sequences) == 1 and response.sequences[0].tokens
            return "inference"
        training = client.create_training_session(config, sampling_rate=0.01, dataset_size=200)
        fb = training.forward_backward([datum_from_sequence([5, 17, 42, 9, 3]), datum_from_sequence([7, 8, 9])])
        step = training.optim_step()
        assert fb.result(120).metrics["loss:sum"] > 0
        assert step.result(120).step == 1
        return "training"


def test_clients_creating_sessions_at_once_all_succeed_and_train(live_server: LiveServer) -> None:
    keys = [create_key(live_server.data_dir, live_server.database, tenant) for tenant in ("alice", "bob")]
    start = threading.Barrier(CLIENTS)
    with ThreadPoolExecutor(CLIENTS) as pool:
        runs = [pool.submit(_train_or_serve, live_server.url, keys[i % 2], i, start) for i in range(CLIENTS)]
        kinds = sorted(run.result(timeout=600) for run in runs)
    assert kinds == ["inference"] * 2 + ["training"] * 6
    # The server is still whole afterwards: a later create works too.
    assert _train_or_serve(live_server.url, keys[0], 0, threading.Barrier(1)) == "training"


def test_a_failed_model_load_beside_good_ones_leaves_later_loads_intact(tmp_path: Path) -> None:
    from transformers import PreTrainedModel

    from tensafe_torch import assets
    from tensafe_torch.loading import load_base

    broken = tmp_path / "broken-model"
    shutil.copytree(assets.TINY_MODEL, broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    tie_weights = PreTrainedModel.tie_weights

    def load(index: int) -> str:
        path = str(broken) if index % 2 else None
        try:
            load_base(build_config({"model": {"path": path}}, environ={}))
        except Exception as exc:
            return type(exc).__name__
        return "loaded"

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(load, range(8)))
    assert outcomes == ["loaded", "BackendError"] * 4
    assert PreTrainedModel.tie_weights is tie_weights
    _, model = load_base(build_config({}, environ={}))
    assert all(not p.is_meta for p in model.parameters())


# -- long polls ------------------------------------------------------------------------------

#: A bigram backend whose forward_backward on a batch of exactly three data runs until the file that
#: TENSAFE_TEST_RELEASE names exists (or a minute passes).
HELD_PLUGIN = """
from tensafe import hookimpl


@hookimpl
def tensafe_register_ml_backends(register):
    def factory():
        import os
        import time
        from pathlib import Path

        from tensafe_bigram.backend import BigramBackend

        class HeldBigram(BigramBackend):
            def forward_backward(self, data, loss_fn, loss_fn_config=None):
                release = Path(os.environ["TENSAFE_TEST_RELEASE"])
                deadline = time.monotonic() + 60
                while len(data) == 3 and not release.exists() and time.monotonic() < deadline:
                    time.sleep(0.05)
                return super().forward_backward(data, loss_fn, loss_fn_config)

        return HeldBigram()

    register("held-bigram", factory)
"""
TENANTS = 4
WAITS_PER_TENANT = 15  # 60 in all, each tenant under its cap


@pytest.fixture
def held_server(live_server: LiveServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LiveServer:
    """A server whose held-bigram sessions run a batch of three only once ``tmp_path / "release"`` exists."""
    plugin_dir = make_distribution(
        tmp_path / "held-plugin",
        "tensafe-held",
        "1.0",
        {"held": "tensafe_held_plugin"},
        {"tensafe_held_plugin": HELD_PLUGIN},
    )
    monkeypatch.setenv("TENSAFE_TEST_RELEASE", str(tmp_path / "release"))
    live_server.stop()
    live_server.start(extra_path=plugin_dir)
    return live_server


def _held_step(url: str, key: str) -> str:
    """An optim_step queued behind a forward_backward that runs until released."""
    config = bigram_config().model_copy(update={"backend": "held-bigram"})
    with TenSafeClient(url, key, max_retries=0) as client:
        session = client.create_training_session(config, sampling_rate=0.01, dataset_size=400)
        session.forward_backward(batch(1, size=3))
        return session.optim_step().future_id


def test_long_polls_hold_no_thread_and_health_answers_at_once(held_server: LiveServer, tmp_path: Path) -> None:
    url = held_server.url
    keys = [create_key(held_server.data_dir, held_server.database, f"tenant{n}") for n in range(TENANTS)]
    steps = [_held_step(url, key) for key in keys]

    def poll(key: str, future_id: str) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {key}"}
        response = httpx.get(f"{url}/api/v1/futures/{future_id}?wait=30", headers=headers, timeout=60)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    with ThreadPoolExecutor(TENANTS * WAITS_PER_TENANT + 1) as pool:
        polls = {
            (key, step): [pool.submit(poll, key, step) for _ in range(WAITS_PER_TENANT)]
            for key, step in zip(keys, steps, strict=True)
        }
        polls[keys[0], steps[0]].append(pool.submit(poll, keys[0], steps[0]))  # the tenant's last under its cap
        time.sleep(3)  # every poll is in and waiting
        assert not any(p.done() for group in polls.values() for p in group)
        for path in ("/healthz", "/readyz"):
            asked = time.monotonic()
            assert httpx.get(f"{url}{path}", timeout=30).status_code == 200
            assert time.monotonic() - asked < 1.0, path
        # Past its cap a tenant's wait answers at once with the status as it is.
        assert len(polls[keys[0], steps[0]]) == MAX_WAITS_PER_TENANT
        assert poll(keys[0], steps[0])["status"] == "queued"
        (tmp_path / "release").touch()
        results = {ids: [p.result(timeout=60) for p in group] for ids, group in polls.items()}
    for (_, step), answers in results.items():
        assert {(r["future_id"], r["status"]) for r in answers} == {(step, "completed")}
        assert all(r["result"]["metrics"]["epsilon"] > 0 for r in answers)


# -- not found ---------------------------------------------------------------------------------


@contextmanager
def statements(engine: Any) -> Iterator[list[str]]:
    """The SQL the service sends while the block runs, with literal ids replaced by a placeholder."""
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        seen.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


def _same_path(api: Any, request: Callable[[str], httpx.Response], theirs: str, absent: str) -> None:
    """``theirs`` (another tenant's, live in this process) and ``absent`` answer alike, by the same queries."""
    with statements(api.service.engine) as for_theirs:
        answer_theirs = request(theirs)
    with statements(api.service.engine) as for_absent:
        answer_absent = request(absent)
    assert answer_theirs.status_code == answer_absent.status_code == 404
    assert json.loads(answer_theirs.text.replace(theirs, "ID")) == json.loads(answer_absent.text.replace(absent, "ID"))
    assert for_theirs == for_absent and for_theirs


def test_another_tenants_ids_answer_as_absent_ones_by_the_same_queries(api: Any) -> None:
    spec = {"config": session_config(), "sampling_rate": 0.01, "dataset_size": 400}
    created = api.http.post("/api/v1/training", json=spec, headers=api.headers("bob"))
    assert created.status_code == 201, created.text
    session_id = created.json()["session_id"]
    queued = api.http.post(
        f"/api/v1/training/{session_id}/forward_backward",
        json={"data": [d.model_dump(mode="json") for d in batch(1)]},
        headers=api.headers("bob"),
    )
    future_id = queued.json()["future_id"]
    api.http.post(f"/api/v1/training/{session_id}/optim_step", json={}, headers=api.headers("bob"))
    exported = api.http.post(f"/api/v1/training/{session_id}/export_tgsp", json={}, headers=api.headers("bob"))
    assert exported.status_code == 200, exported.text
    artifact_id = exported.json()["artifact_id"]
    absent = "0" * 32
    alice = api.headers("alice")

    def get(path: str) -> Callable[[str], httpx.Response]:
        return lambda some_id: api.http.get(path.format(some_id), headers=alice)

    fb = {"data": [d.model_dump(mode="json") for d in batch(2)]}
    _same_path(api, get("/api/v1/training/{}"), session_id, absent)
    _same_path(api, get("/api/v1/futures/{}"), future_id, absent)
    _same_path(api, get("/api/v1/futures/{}?wait=1"), future_id, absent)
    _same_path(api, get("/api/v1/packages/{}"), artifact_id, absent)
    _same_path(
        api,
        lambda some_id: api.http.post(f"/api/v1/training/{some_id}/forward_backward", json=fb, headers=alice),
        session_id,
        absent,
    )
    _same_path(
        api,
        lambda some_id: api.http.post(f"/api/v1/training/{some_id}/sample", json={"prompts": ["a"]}, headers=alice),
        session_id,
        absent,
    )
