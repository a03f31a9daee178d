"""`tensafe privacy audit` on the embedded model: an honest DP run's lower bound stays below its claim."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ENV = {**os.environ, "TENSAFE_STRICT_PLUGINS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.mark.parametrize(("mode", "canaries"), [("black-box", 100), ("white-box", 1000)])
def test_an_honest_run_of_the_embedded_model_is_consistent(tmp_path: Path, mode: str, canaries: int) -> None:
    config = tmp_path / "short.yaml"
    config.write_text("training:\n  steps: 10\n")
    command = ["privacy", "audit", str(config), "--mode", mode, "--canaries", str(canaries), "--json"]
    result = subprocess.run(
        [sys.executable, "-m", "tensafe.cli.main", *command],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["mode"] == mode and summary["verdict"] == "consistent"
    assert summary["epsilon_lower_bound"] <= summary["claimed_epsilon"] <= 8.0
    assert summary["canaries"] == canaries and summary["steps"] == 10
    assert not list(tmp_path.glob("tensafe-runs*")), "the audit leaves no run behind"
    print(
        f"{mode}: epsilon >= {summary['epsilon_lower_bound']:.3f} (claimed {summary['claimed_epsilon']:.3f}), "
        f"{summary['correct']}/{summary['guesses']} right"
    )
