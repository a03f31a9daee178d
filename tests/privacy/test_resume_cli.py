"""`tensafe train --resume` through the command line: continue and extend a DP run at its own noise."""

from __future__ import annotations

import json
from pathlib import Path

from tests.core.test_plugins import run_cli


def write_config(tmp_path: Path, dataset: Path, batch_size: int = 8) -> Path:
    path = tmp_path / "dp.yaml"
    path.write_text(
        f"backend: bigram\noutput_dir: {tmp_path / 'runs'}\ndata:\n  path: {dataset}\n"
        "dp:\n  accountant: rdp\n  target_epsilon: 8\n  target_delta: 0.001\n"
        f"optimizer:\n  learning_rate: 0.1\ntraining:\n  steps: 4\n  batch_size: {batch_size}\n"
    )
    return path


def report(tmp_path: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((tmp_path / "runs" / "r" / "report.json").read_text())


def test_a_finished_dp_run_is_extended_to_more_steps_at_the_noise_it_was_calibrated_with(
    qa_dataset: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path, qa_dataset)
    first = run_cli("train", str(config), "--run-name", "r")
    assert first.returncode == 0, first.stderr
    assert "DP-SGD: noise multiplier" in first.stderr and "4 steps planned" in first.stderr
    sigma = report(tmp_path)["config"]["dp"]["noise_multiplier"]
    epsilon = report(tmp_path)["privacy"]["epsilon"]

    # The first run spent its whole budget; a larger budget lets it go on, at the same noise.
    extended = run_cli(
        "train",
        str(config),
        "--resume",
        str(tmp_path / "runs" / "r"),
        "--steps",
        "6",
        env={"TENSAFE_CONFIG__DP__TARGET_EPSILON": "12"},
    )
    assert extended.returncode == 0, extended.stderr
    after = report(tmp_path)
    assert after["steps"] == 6 and after["privacy"]["steps"] == 6
    assert after["config"]["dp"]["noise_multiplier"] == sigma, "a resume keeps the calibrated noise"
    assert epsilon < after["privacy"]["epsilon"], "two more steps spend more"
    assert [h["step"] for h in after["history"]] == [1, 2, 3, 4, 5, 6]


def test_extending_past_the_budget_stops_at_the_budget(qa_dataset: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path, qa_dataset)
    assert run_cli("train", str(config), "--run-name", "r").returncode == 0
    beyond = run_cli("train", str(config), "--resume", str(tmp_path / "runs" / "r"), "--steps", "40")
    assert beyond.returncode == 3, beyond.stderr
    assert "budget" in beyond.stderr and "Traceback" not in beyond.stderr
    assert report(tmp_path)["privacy"]["epsilon"] <= 8


def test_a_resume_with_other_privacy_parameters_names_what_differs(qa_dataset: Path, tmp_path: Path) -> None:
    assert run_cli("train", str(write_config(tmp_path, qa_dataset)), "--run-name", "r").returncode == 0
    other = write_config(tmp_path, qa_dataset, batch_size=6)
    refused = run_cli("train", str(other), "--resume", str(tmp_path / "runs" / "r"), "--steps", "6")
    assert refused.returncode == 2, refused.stderr
    assert "training.batch_size" in refused.stderr and "Traceback" not in refused.stderr


def test_resume_from_a_directory_without_a_checkpoint_is_refused(qa_dataset: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = run_cli("train", str(write_config(tmp_path, qa_dataset)), "--resume", str(tmp_path / "empty"))
    assert result.returncode == 2 and "no checkpoint there" in result.stderr


def test_a_dp_run_whose_batch_covers_every_record_is_warned_about(qa_dataset: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path, qa_dataset, batch_size=64)
    result = run_cli("train", str(config), "--run-name", "q1", "--steps", "2")
    assert result.returncode == 0, result.stderr
    assert "q = 64/36 = 1" in result.stderr and "no privacy amplification" in result.stderr


def test_a_seeded_dp_run_says_it_is_not_private_as_it_starts(qa_dataset: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path, qa_dataset)
    result = run_cli(
        "train", str(config), "--run-name", "s", "--steps", "2", env={"TENSAFE_CONFIG__DP__SECURE_RNG": "false"}
    )
    assert result.returncode == 0, result.stderr
    assert "reproducible and NOT private" in result.stderr
    assert "NOT private" in (tmp_path / "runs" / "s" / "report.txt").read_text()
