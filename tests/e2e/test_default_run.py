"""`tensafe run` with no arguments: the embedded model and data, DP-SGD, offline, in minutes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def test_default_run_learns_privately_and_reports(tmp_path: Path) -> None:
    env = {**os.environ, "TENSAFE_STRICT_PLUGINS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "tensafe.cli.main", "run", "--run-name", "default"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    seconds = time.monotonic() - start
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "tensafe-runs" / "default"
    report = json.loads((run_dir / "report.json").read_text())
    loss = report["held_out_loss"]
    assert loss["after"] < 0.25 * loss["before"], loss
    privacy = report["privacy"]
    assert privacy["accountant"] == "rdp" and privacy["epsilon"] <= report["config"]["dp"]["target_epsilon"]
    assert privacy["steps"] == report["steps"] == report["config"]["training"]["steps"]
    assert report["adapter_change"] > 0
    assert report["samples"], "the embedded default ships public probe prompts"
    for sample in report["samples"]:
        assert sample["before"] != sample["after"]
    # Nothing of a record leaves the run: no prompt or completion of the private dataset is shown or written.
    dataset = Path(report["data"])
    written = (
        result.stdout + result.stderr + (run_dir / "report.json").read_text() + (run_dir / "report.txt").read_text()
    )
    records = [json.loads(line) for line in dataset.read_text().splitlines() if line.strip()]
    leaked = [r["prompt"] for r in records if r["prompt"] in written]
    assert not leaked, leaked[:3]
    assert not any(sample["prompt"] in {r["prompt"] for r in records} for sample in report["samples"])
    assert all(set(h) <= {"step", "epsilon", "held_out_loss"} for h in report["history"])
    assert privacy["privacy_unit"] and privacy["protected_set"]["records"] == report["records"]["train"]
    assert privacy["max_grad_norm"] == report["config"]["dp"]["max_grad_norm"]
    assert len(report["held_out_records"]) == report["records"]["eval"]
    assert privacy["randomness"].startswith("os-csprng") and not privacy["reproducible_noise"]
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "checkpoint" / "progress.json").is_file()
    assert (run_dir / "report.html").is_file() and (run_dir / "metrics.jsonl").is_file()
    assert report["device"] == "cpu" or report["device"].startswith("cuda"), "the report says where it ran"
    assert "DP-SGD: noise multiplier" in result.stderr and "300 steps planned" in result.stderr
    text = (run_dir / "report.txt").read_text()
    assert "held-out loss:" in text and "epsilon by step:" in text
    assert "training" in result.stderr, "progress bar"
    print(
        f"default run: {seconds:.0f} s, held-out loss {loss['before']:.3f} -> {loss['after']:.3f}, "
        f"epsilon {privacy['epsilon']:.3f}"
    )
