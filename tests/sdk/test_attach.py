"""Attaching to an existing session: after the client restarts, in-process and on a server alike."""

from __future__ import annotations

import pytest

from tensafe.sdk import NotFound
from tests.sdk.test_client import local_client, remote_client
from tests.serving import LiveServer, batch, bigram_config


def test_a_new_client_attaches_to_a_session_and_continues_it(live_server: LiveServer) -> None:
    with remote_client(live_server) as first:
        session = first.create_training_session(bigram_config(), sampling_rate=0.01, dataset_size=400)
        session.forward_backward(batch(1))
        told = session.optim_step().result(60).metrics["epsilon"]
        served = first.create_inference_session(bigram_config())
    with remote_client(live_server) as second:
        listed = second.list_sessions()
        assert [(s.session_id, s.kind) for s in listed] == [
            (session.session_id, "training"),
            (served.session_id, "inference"),
        ]
        again = second.training_session(session.session_id)
        assert again.privacy_spent() is not None and again.privacy_spent().epsilon == told  # type: ignore[union-attr]
        again.forward_backward(batch(2))
        assert again.optim_step().result(60).step == 2
        assert second.inference_session(served.session_id).generate(["record 1"])[0].sequences
        with pytest.raises(NotFound):
            second.training_session(served.session_id)
        with pytest.raises(NotFound):
            second.inference_session(session.session_id)
    with remote_client(live_server, "bob") as other, pytest.raises(NotFound):
        other.training_session(session.session_id)


def test_attaching_in_process_finds_the_same_session() -> None:
    with local_client() as client:
        session = client.create_training_session(bigram_config(), sampling_rate=0.01, dataset_size=400)
        session.forward_backward(batch(1))
        session.optim_step().result(60)
        assert client.training_session(session.session_id).info().step == 1
        assert [s.session_id for s in client.list_sessions()] == [session.session_id]
        with pytest.raises(NotFound):
            client.training_session("nope")
