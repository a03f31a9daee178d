"""What leaves a DP run: only what the release gate allows, with the protected set stated and stable."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tensafe import hookimpl
from tensafe.config import RunConfig, build_config
from tensafe.data import load_records, split_records
from tensafe.orchestrator import TenSafeOrchestrator
from tensafe.plugins import TensafePluginManager
from tensafe.testing import fresh_plugin_manager
from tests.mocks.accountants import LinearAccountantPlugin
from tests.mocks.observers import RunObserver
from tests.mocks.rewards import AuditRecorder

#: What a step of a DP run may release: its number, the spend, and held-out values (labelled outside).
RELEASABLE = {"step", "epsilon", "held_out_loss"}


class BatchSizeWatcher:
    def __init__(self) -> None:
        self.sizes: list[int] = []

    @hookimpl
    def tensafe_approve_step(self, batch_size: int) -> None:
        self.sizes.append(batch_size)


@pytest.fixture
def pm() -> TensafePluginManager:
    return fresh_plugin_manager(plugins=[LinearAccountantPlugin()], autoload=True)


def dp_run_config(dataset: Path, tmp_path: Path, **data: Any) -> RunConfig:
    return build_config(
        {
            "backend": "bigram",
            "output_dir": str(tmp_path / "runs"),
            "data": {"path": str(dataset), **data},
            "optimizer": {"learning_rate": 0.1},
            "training": {"steps": 6, "batch_size": 8, "eval_every": 3, "checkpoint_every": 2},
            "sampling": {"max_tokens": 6, "temperature": 0},
            "dp": {"accountant": "linear-test", "noise_multiplier": 1.0, "target_epsilon": None},
        },
        environ={},
    )


def test_a_dp_run_releases_no_statistic_of_its_training_batches(
    pm: TensafePluginManager, qa_dataset: Path, tmp_path: Path
) -> None:
    observer, audit, sizes = RunObserver(), AuditRecorder(), BatchSizeWatcher()
    for plugin in (observer, audit, sizes):
        pm.register(plugin)
    report = TenSafeOrchestrator(dp_run_config(qa_dataset, tmp_path), plugin_manager=pm).run(run_dir=tmp_path / "r")
    reported = [metrics for _, metrics in observer.named("report")]
    assert len(reported) == 6 and all(set(m) <= RELEASABLE and "epsilon" in m for m in reported)
    assert all(set(h) <= RELEASABLE for h in report["history"])
    assert "held_out_loss" in report["history"][2], "the eval_every curve is released (labelled outside)"
    progress = json.loads((tmp_path / "r" / "checkpoint" / "progress.json").read_text())
    assert all(set(h) <= RELEASABLE for h in progress["history"])
    steps = [e.details for e in audit.events if e.operation == "train.step"]
    assert len(steps) == 6 and all(set(d) <= RELEASABLE for d in steps)
    assert sizes.sizes == [8] * 6, "under DP the hooks see the expected batch size, not a Poisson batch's"
    text = (tmp_path / "r" / "report.txt").read_text()
    assert "training loss by step" not in text and "outside the privacy guarantee" in text


def test_without_dp_everything_is_shown(pm: TensafePluginManager, qa_dataset: Path, tmp_path: Path) -> None:
    config = dp_run_config(qa_dataset, tmp_path)
    config.dp.enabled = False
    report = TenSafeOrchestrator(config, plugin_manager=pm).run(run_dir=tmp_path / "r")
    assert {"loss", "batch_size"} <= set(report["history"][0])
    assert len(report["samples"]) == 3, "no privacy claim: held-out prompts are shown as before"


def test_a_dp_run_shows_no_record_text_and_names_held_out_records_by_line(
    pm: TensafePluginManager, qa_dataset: Path, tmp_path: Path
) -> None:
    report = TenSafeOrchestrator(dp_run_config(qa_dataset, tmp_path), plugin_manager=pm).run(run_dir=tmp_path / "r")
    written = (tmp_path / "r" / "report.json").read_text() + (tmp_path / "r" / "report.txt").read_text()
    for record in load_records(qa_dataset):
        assert record.prompt not in written
    assert report["samples"] == [] and report["sample_prompts"] == ""
    lines = qa_dataset.read_text().splitlines()
    held = [json.loads(lines[n - 1]) for n in report["held_out_records"]]
    assert len(held) == report["records"]["eval"] == 4
    _, expected = split_records(load_records(qa_dataset), 0.1)
    assert [h["prompt"] for h in held] == [r.prompt for r in expected]


def test_samples_come_from_public_probes_or_declared_public_data(
    pm: TensafePluginManager, qa_dataset: Path, tmp_path: Path
) -> None:
    probes = ["item 999: colour?", "what colour is the sky?"]
    report = TenSafeOrchestrator(dp_run_config(qa_dataset, tmp_path, probes=probes), plugin_manager=pm).run(
        run_dir=tmp_path / "probes"
    )
    assert [s["prompt"] for s in report["samples"]] == probes
    assert report["sample_prompts"].startswith("public probe")
    public = TenSafeOrchestrator(dp_run_config(qa_dataset, tmp_path, public=True), plugin_manager=pm).run(
        run_dir=tmp_path / "public"
    )
    assert len(public["samples"]) == 3
    outside = public["privacy"]["outside_guarantee"]
    assert any("declared public" in item for item in outside)


def test_the_certificate_states_the_unit_the_protected_set_and_what_lies_outside(
    pm: TensafePluginManager, qa_dataset: Path, tmp_path: Path
) -> None:
    report = TenSafeOrchestrator(dp_run_config(qa_dataset, tmp_path), plugin_manager=pm).run(run_dir=tmp_path / "r")
    cert = report["privacy"]
    assert cert["privacy_unit"] == "one JSONL record of the training file" and cert["mode"] == "sft"
    assert cert["max_grad_norm"] == 1.0
    assert cert["protected_set"]["records"] == 36
    assert cert["protected_set"]["digest"].startswith("hmac-sha256:")
    assert any("held-out loss computed on 4 held-out records" in item for item in cert["outside_guarantee"])
    assert cert["reproducible_noise"] is False and cert["randomness"].startswith("os-csprng")
    key = tmp_path / "r" / "protected-set.key"
    assert key.stat().st_mode & 0o077 == 0, "the digest key is readable by its owner only"
    # The digest is a keyed commitment: another run (another key) over the same records gives another digest.
    other = TenSafeOrchestrator(dp_run_config(qa_dataset, tmp_path), plugin_manager=pm).run(run_dir=tmp_path / "o")
    assert other["privacy"]["protected_set"]["digest"] != cert["protected_set"]["digest"]


def test_a_seeded_run_says_it_is_not_private(pm: TensafePluginManager, qa_dataset: Path, tmp_path: Path) -> None:
    config = dp_run_config(qa_dataset, tmp_path)
    config.dp.secure_rng = False
    report = TenSafeOrchestrator(config, plugin_manager=pm).run(run_dir=tmp_path / "r")
    assert report["privacy"]["reproducible_noise"] is True and "NOT private" in report["privacy"]["randomness"]
    assert "NOT private" in (tmp_path / "r" / "report.txt").read_text()


def test_adding_one_record_moves_no_other_between_train_and_held_out(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    rows = [json.dumps({"prompt": f"person {i}:", "completion": f" value {i * 7 % 13}"}) for i in range(1000)]
    path.write_text("\n".join(rows) + "\n")
    train, held = split_records(load_records(path), 0.125)
    path.write_text("\n".join([*rows[:500], json.dumps({"text": "one more record"}), *rows[500:]]) + "\n")
    train2, held2 = split_records(load_records(path), 0.125)
    key = [(r.prompt, r.completion) for r in train]
    key2 = [(r.prompt, r.completion) for r in train2 if r.completion != "one more record"]
    assert key == key2
    assert [(r.prompt, r.completion) for r in held] == [
        (r.prompt, r.completion) for r in held2 if r.completion != "one more record"
    ]
    assert 80 <= len(held) <= 170, "about an eighth is held out"


def test_a_separate_eval_file_holds_out_nothing_from_the_training_file(
    pm: TensafePluginManager, qa_dataset: Path, tmp_path: Path
) -> None:
    eval_path = tmp_path / "eval.jsonl"
    eval_path.write_text(json.dumps({"prompt": "item 500: colour?", "completion": " red"}) + "\n")
    config = dp_run_config(qa_dataset, tmp_path, eval_path=str(eval_path))
    report = TenSafeOrchestrator(config, plugin_manager=pm).run(run_dir=tmp_path / "r")
    assert report["records"] == {"train": 40, "eval": 1} and report["held_out_records"] == [1]
    assert report["privacy"]["protected_set"]["records"] == 40
    assert report["privacy"]["sampling_rate"] == pytest.approx(8 / 40)
