"""TenSafeClient in-process and against a live server: same calls, same results, same errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tensafe import hookimpl
from tensafe.engine.ledger import CALLER_DUTIES, PRIVACY_UNIT_SESSION, RANDOMNESS_SEEDED, SAMPLING_DECLARED
from tensafe.errors import UsageError
from tensafe.sdk import (
    InvalidRequest,
    NotFound,
    OperationFailed,
    PrivacyBudgetExceeded,
    TenSafeClient,
    TrainingSession,
    Unauthorized,
)
from tensafe.testing import fresh_plugin_manager
from tests.mocks.flaky import FlakyTransport
from tests.serving import LiveServer, batch, bigram_config, create_key


def local_client() -> TenSafeClient:
    return TenSafeClient(plugin_manager=fresh_plugin_manager(autoload=True))


def remote_client(server: LiveServer, tenant: str = "alice", **kwargs: Any) -> TenSafeClient:
    return TenSafeClient(server.url, create_key(server.data_dir, server.database, tenant), **kwargs)


def training_script(client: TenSafeClient, steps: int = 4) -> dict[str, Any]:
    """One script, run unchanged through both doors."""
    session = client.create_training_session(bigram_config(), sampling_rate=0.01, dataset_size=400)
    losses, epsilons = [], []
    for n in range(1, steps + 1):
        fb = session.forward_backward(batch(n))
        opt = session.optim_step()
        losses.append(fb.result(timeout=60).metrics["loss:sum"])
        epsilons.append(opt.result(timeout=60).metrics["epsilon"])
    spent = session.privacy_spent()
    assert spent is not None
    text = session.sample(["record 1"])[0].sequences[0].text
    return {"losses": losses, "epsilons": epsilons, "epsilon": spent.epsilon, "step": session.info().step, "text": text}


def test_futures_run_in_submission_order_in_process() -> None:
    with local_client() as client:
        session = client.create_training_session(bigram_config(), sampling_rate=0.01, dataset_size=400)
        futures = []
        for n in range(1, 4):
            futures.append(session.forward_backward(batch(n)))
            futures.append(session.optim_step())
        steps = [f.result(timeout=60).step for f in futures[1::2]]  # type: ignore[attr-defined]
        assert steps == [1, 2, 3]
        assert session.info().step == 3 and session.info().pending == 0


def test_in_process_and_server_give_identical_losses_and_epsilon(live_server: LiveServer) -> None:
    with local_client() as client:
        here = training_script(client)
    with remote_client(live_server) as client:
        there = training_script(client)
    assert here == there
    assert here["losses"][-1] < here["losses"][0] and here["step"] == 4


def _exhaust_budget(session: TrainingSession) -> tuple[float, int]:
    last = 0.0
    for n in range(1, 30):
        session.forward_backward(batch(n))
        try:
            last = session.optim_step().result(timeout=60).metrics["epsilon"]
        except PrivacyBudgetExceeded as exc:
            return last, exc.steps
    raise AssertionError("the budget was never reached")


@pytest.mark.parametrize("door", ["local", "remote"])
def test_errors_are_typed_alike_through_both_doors(door: str, live_server: LiveServer) -> None:
    client = local_client() if door == "local" else remote_client(live_server)
    with client:
        session = client.create_training_session(
            bigram_config(target_epsilon=0.6), sampling_rate=0.01, dataset_size=400
        )
        spent, steps = _exhaust_budget(session)
        privacy = session.privacy_spent()
        assert privacy is not None and privacy.epsilon == spent <= 0.6 and session.info().step == steps
        with pytest.raises(NotFound):
            session.load_state("no-such-state")
        with pytest.raises(InvalidRequest, match="sampling_rate"):
            client.create_training_session(bigram_config())
        with pytest.raises(UsageError, match="forward_backward first"):
            client.create_training_session(bigram_config(enabled=False)).optim_step().result(60)


def test_a_bad_key_raises_unauthorized(live_server: LiveServer) -> None:
    with TenSafeClient(live_server.url, "tsk_0000_bad") as client, pytest.raises(Unauthorized):
        client.create_training_session(bigram_config(), sampling_rate=0.01, dataset_size=400)


def test_retries_survive_refusals_and_lost_responses_without_running_a_step_twice(live_server: LiveServer) -> None:
    transport = FlakyTransport(refuse=2, drop_after=0)
    with remote_client(live_server, transport=transport, max_retries=4) as client:
        session = client.create_training_session(bigram_config(), sampling_rate=0.01, dataset_size=400)
        transport.drop_after = 2  # the next two POSTs reach the server, but their answers are lost
        session.forward_backward(batch(1))
        result = session.optim_step().result(timeout=60)
        assert result.step == 1 and result.metrics["batch_size"] == 4.0
        assert session.info().step == 1
    posts = [r for r in transport.requests if r.startswith("POST")]
    assert len(posts) == 2 + 1 + 2 * 2  # refused twice, created, each queued call sent twice


def test_retries_give_up_with_a_retryable_error(tmp_path: Path) -> None:
    from tests.serving import free_port

    with TenSafeClient(f"http://127.0.0.1:{free_port()}", "tsk_a_b", max_retries=1) as client:
        with pytest.raises(OperationFailed) as caught:
            client.create_training_session(bigram_config(), sampling_rate=0.01, dataset_size=400)
        assert caught.value.retryable


def test_save_and_load_state_in_process() -> None:
    with local_client() as client:
        session = client.create_training_session(bigram_config(), sampling_rate=0.01, dataset_size=400)
        session.forward_backward(batch(1))
        session.optim_step().result(60)
        saved = session.save_state()
        text = session.sample(["record 2"])[0].sequences[0].text
        for n in (2, 3):
            session.forward_backward(batch(n))
            session.optim_step().result(60)
        info = session.load_state(saved)
        assert info.step == 1 and info.privacy is not None and info.privacy.steps == 3
        assert session.sample(["record 2"])[0].sequences[0].text == text


@pytest.mark.parametrize("door", ["local", "remote"])
def test_an_empty_poisson_batch_is_a_noise_only_step_charged_like_any_other(door: str, live_server: LiveServer) -> None:
    client = local_client() if door == "local" else remote_client(live_server)
    with client:
        session = client.create_training_session(bigram_config(), sampling_rate=0.01, dataset_size=400)
        empty = session.optim_step().result(60)
        assert empty.step == 1 and empty.metrics["batch_size"] == 0.0 and "loss" not in empty.metrics
        with_data = client.create_training_session(bigram_config(), sampling_rate=0.01, dataset_size=400)
        with_data.forward_backward(batch(1))
        assert empty.metrics["epsilon"] == with_data.optim_step().result(60).metrics["epsilon"] > 0
        session.forward_backward(batch(2))
        after = session.optim_step().result(60)
        spent = session.privacy_spent()
        assert after.step == 2 and spent is not None and spent.steps == 2 and spent.epsilon == after.metrics["epsilon"]
        assert after.metrics["epsilon"] > empty.metrics["epsilon"]


@pytest.mark.parametrize("door", ["local", "remote"])
def test_a_session_states_its_privacy_unit_sampling_randomness_and_the_callers_duties(
    door: str, live_server: LiveServer
) -> None:
    client = local_client() if door == "local" else remote_client(live_server)
    with client:
        session = client.create_training_session(bigram_config(), sampling_rate=0.01, dataset_size=400)
        session.forward_backward(batch(1))
        session.optim_step().result(60)
        spent = session.privacy_spent()
    assert spent is not None
    assert (spent.accountant, spent.steps, spent.sampling_rate, spent.max_grad_norm) == ("rdp", 1, 0.01, 1.0)
    assert (spent.mode, spent.privacy_unit, spent.sampling) == ("session", PRIVACY_UNIT_SESSION, SAMPLING_DECLARED)
    assert set(CALLER_DUTIES) == set(spent.caller_duties)
    assert any("empty one included" in duty for duty in spent.caller_duties)
    assert spent.outside_guarantee and all("returned only to the caller" in item for item in spent.outside_guarantee)
    # bigram_config seeds the noise: the session must say so.
    assert spent.randomness == RANDOMNESS_SEEDED and spent.reproducible_noise is True


class _StepWatcher:
    """What step hooks are shown."""

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []
        self.reported: list[dict[str, float]] = []

    @hookimpl
    def tensafe_approve_step(self, batch_size: int) -> None:
        self.batch_sizes.append(batch_size)

    @hookimpl
    def tensafe_report_step(self, metrics: dict[str, float]) -> None:
        self.reported.append(dict(metrics))


def test_under_dp_step_hooks_see_the_expected_batch_size_and_no_batch_statistics() -> None:
    watcher = _StepWatcher()
    with TenSafeClient(plugin_manager=fresh_plugin_manager(plugins=[watcher], autoload=True)) as client:
        session = client.create_training_session(bigram_config(), sampling_rate=0.01, dataset_size=400)
        session.forward_backward(batch(1, size=2))
        caller_sees = session.optim_step().result(60).metrics
        session.optim_step().result(60)  # an empty batch
    assert caller_sees["batch_size"] == 2.0 and "loss" in caller_sees
    assert watcher.batch_sizes == [4, 4]  # training.batch_size, whatever the batch held
    assert [sorted(m) for m in watcher.reported] == [["epsilon"], ["epsilon"]]


def test_a_saved_spend_edited_below_its_model_step_is_refused() -> None:
    import copy

    from tensafe.api import TrainingSessionCreate
    from tensafe.sessions import TrainingSessionCore

    spec = TrainingSessionCreate(config=bigram_config(), sampling_rate=0.01, dataset_size=400)
    pm = fresh_plugin_manager(autoload=True)
    core = TrainingSessionCore(spec, "s1", plugin_manager=pm)
    for n in range(1, 4):
        core.forward_backward(batch(n))
        core.optim_step()
    state, meta = core.snapshot()
    lowered = copy.deepcopy(meta)
    fresh = TrainingSessionCore(spec, "s2", plugin_manager=pm)
    fresh.forward_backward(batch(1))
    fresh.optim_step()
    one_step = fresh.snapshot()[1]["privacy"]["accountant_state"]
    lowered["privacy"]["accountant_state"] = one_step  # a spend of 1 step sealed next to a 3-step model
    other = TrainingSessionCore(spec, "s3", plugin_manager=pm)
    with pytest.raises(UsageError, match="1 steps accounted, 3 taken"):
        other.restore(state, lowered)
    assert other.step == 0, "nothing was loaded"
    lowered["step"] = 1  # lowering the step too: the (sealed) model state still says 3
    with pytest.raises(UsageError, match="backend is at step 3, session at 1"):
        other.restore(state, lowered)
    other.restore(state, meta)
    assert other.step == 3 and other.privacy is not None and other.privacy.accountant.steps == 3
