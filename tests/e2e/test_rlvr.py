"""`tensafe run rlvr.yaml`: the shipped RLVR example learns its task on the embedded model, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tensafe_torch import assets

EXAMPLE = Path(assets.__file__).parent / "rlvr.yaml"
MARGIN = 0.2


def test_rlvr_example_raises_the_held_out_reward(tmp_path: Path) -> None:
    env = {**os.environ, "TENSAFE_STRICT_PLUGINS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "tensafe.cli.main", "run", str(EXAMPLE), "--output-dir", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    seconds = time.monotonic() - start
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "rlvr-country-city"
    report = json.loads((run_dir / "report.json").read_text())
    reward = report["held_out_reward"]
    assert reward["after"] >= reward["before"] + MARGIN, reward
    curve = [h["held_out_reward"] for h in report["history"] if "held_out_reward" in h]
    assert len(curve) >= 4 and max(curve[len(curve) // 2 :]) >= reward["before"] + MARGIN
    assert report["mode"] == "rlvr" and report["steps"] == report["config"]["training"]["steps"]
    assert all(h["excluded_rollouts"] == 0 for h in report["history"])
    text = (run_dir / "report.txt").read_text()
    assert "held-out reward:" in text and "held-out reward by step:" in text
    print(f"rlvr example: {seconds:.0f} s, held-out reward {reward['before']:.3f} -> {reward['after']:.3f}")
