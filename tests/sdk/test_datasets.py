"""Sessions over a dataset: batches drawn by the session itself, in-process and on a server alike."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tensafe.engine.ledger import SAMPLING_BY_SERVER
from tensafe.sdk import InvalidRequest, NotFound, TenSafeClient
from tests.sdk.test_client import local_client, remote_client
from tests.serving import LiveServer, batch, bigram_config


def write_dataset(path: Path, records: int = 30) -> Path:
    lines = [json.dumps({"prompt": f"question {i}?", "completion": f" answer {i}"}) for i in range(records)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("door", ["local", "remote"])
def test_a_dataset_session_samples_its_own_batches_and_owes_the_caller_nothing(
    door: str, live_server: LiveServer, tmp_path: Path
) -> None:
    dataset = write_dataset(tmp_path / "private.jsonl")
    config = bigram_config()
    config.training.batch_size = 6
    client: TenSafeClient = local_client() if door == "local" else remote_client(live_server)
    with client:
        session = client.create_training_session(config, dataset=dataset)
        epsilons = []
        for _ in range(3):
            metrics = session.train_step().result(60).metrics
            assert set(metrics) == {"epsilon"}, metrics
            epsilons.append(metrics["epsilon"])
        assert epsilons == sorted(epsilons) and epsilons[0] > 0
        spent = session.privacy_spent()
        assert spent is not None and spent.steps == 3 and spent.caller_duties == []
        assert spent.sampling == SAMPLING_BY_SERVER and spent.sampling_rate == pytest.approx(6 / 30)
        with pytest.raises(InvalidRequest, match="train_step"):
            session.forward_backward(batch(1)).result(60)
        # A session on your own batches has no train_step.
        own = client.create_training_session(config, sampling_rate=0.01, dataset_size=400)
        with pytest.raises(InvalidRequest, match="dataset"):
            own.train_step().result(60)


def test_a_dataset_uploads_once_and_serves_several_sessions(live_server: LiveServer, tmp_path: Path) -> None:
    with remote_client(live_server) as client:
        uploaded = client.upload_dataset(write_dataset(tmp_path / "d.jsonl", 12))
        assert uploaded.records == 12 and uploaded.name == "d.jsonl"
        for _ in range(2):
            session = client.create_training_session(bigram_config(), dataset=uploaded)
            assert session.train_step().result(60).step == 1
    with remote_client(live_server, "bob") as other, pytest.raises(NotFound):
        other.create_training_session(bigram_config(), dataset=uploaded.dataset_id)


def test_local_only_settings_are_refused_before_anything_is_sent(live_server: LiveServer, tmp_path: Path) -> None:
    config = bigram_config()
    config.model.path = str(tmp_path)
    with remote_client(live_server) as client, pytest.raises(InvalidRequest, match="model.path"):
        client.create_training_session(config, sampling_rate=0.01, dataset_size=400)
