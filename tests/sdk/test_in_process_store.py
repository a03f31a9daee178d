"""The in-process transport runs sessions through the session manager: commits are compare-and-set on the step."""

from __future__ import annotations

import pytest

from tensafe.api import ForwardBackwardRequest, OptimStepRequest, TrainingSessionCreate
from tensafe.sdk.transports import InProcessTransport
from tensafe.session_manager import SessionMoved, execute
from tensafe.testing import fresh_plugin_manager
from tests.serving import batch, bigram_config


def _transport_with_session() -> tuple[InProcessTransport, str]:
    transport = InProcessTransport(fresh_plugin_manager(autoload=True))
    spec = TrainingSessionCreate(config=bigram_config(), sampling_rate=0.01, dataset_size=400)
    return transport, transport.create_training(spec).session_id


def _step(transport: InProcessTransport, session_id: str, n: int) -> dict[str, float]:
    transport.submit(session_id, ForwardBackwardRequest(data=batch(n))).result(timeout=60)
    result = transport.submit(session_id, OptimStepRequest()).result(timeout=60)
    metrics: dict[str, float] = result["metrics"]
    return metrics


def test_a_stale_copy_cannot_commit_over_the_session_or_its_privacy_spend() -> None:
    transport, session_id = _transport_with_session()
    stale = transport.store.load(session_id)  # a second copy, at step 0
    epsilon = _step(transport, session_id, 1)["epsilon"]

    execute(stale.core, ForwardBackwardRequest(data=batch(7)))
    with pytest.raises(SessionMoved):
        transport.sessions.run(session_id, stale, "optim_step", lambda: execute(stale.core, OptimStepRequest()))

    assert stale.evicted
    info = transport.info(session_id)
    assert info.step == 1
    assert info.privacy is not None and info.privacy.epsilon == pytest.approx(epsilon)
    transport.close()


def test_a_step_that_ran_but_did_not_commit_is_rolled_back_to_the_committed_state(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    transport, session_id = _transport_with_session()
    first = _step(transport, session_id, 1)
    committed = transport.store.commit

    def refuse(*args: object, **kwargs: bool) -> None:
        raise OSError("the store is unavailable")

    monkeypatch.setattr(transport.store, "commit", refuse)
    with pytest.raises(OSError):
        transport.submit(session_id, OptimStepRequest()).result(timeout=60)
    monkeypatch.setattr(transport.store, "commit", committed)

    # The copy that moved to step 2 without committing was evicted; the session is rebuilt at step 1.
    info = transport.info(session_id)
    assert info.step == 1
    assert info.privacy is not None and info.privacy.epsilon == pytest.approx(first["epsilon"])
    second = _step(transport, session_id, 2)
    assert transport.info(session_id).step == 2 and second["epsilon"] > first["epsilon"]
    transport.close()
