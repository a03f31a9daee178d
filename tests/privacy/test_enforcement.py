"""The orchestrator with a real accountant: the budget is never exceeded, spend survives restarts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tensafe.config import RunConfig, build_config
from tensafe.errors import PrivacyBudgetExceeded
from tensafe.orchestrator import TenSafeOrchestrator
from tensafe.testing import fresh_plugin_manager
from tensafe_privacy.accountants import RdpAccountant

DELTA = 1e-3


def dp_run_config(dataset: Path, tmp_path: Path, **dp: Any) -> RunConfig:
    return build_config(
        {
            "backend": "bigram",
            "output_dir": str(tmp_path / "runs"),
            "data": {"path": str(dataset)},
            "optimizer": {"learning_rate": 0.1},
            "training": {"steps": 10, "batch_size": 8},
            "dp": {"accountant": "rdp", "target_delta": DELTA, "secure_rng": False, **dp},
        },
        environ={},
    )


def test_calibrated_run_spends_at_most_its_budget(qa_dataset: Path, tmp_path: Path) -> None:
    pm = fresh_plugin_manager(autoload=True)
    report = TenSafeOrchestrator(dp_run_config(qa_dataset, tmp_path, target_epsilon=2.0), plugin_manager=pm).run()
    certificate = report["privacy"]
    assert certificate["accountant"] == "rdp" and certificate["steps"] == 10
    assert certificate["epsilon"] <= 2.0
    direct = RdpAccountant()
    direct.compose_step(8 / 36, certificate["noise_multiplier"], 10)
    assert certificate["epsilon"] == direct.get_epsilon(DELTA)
    epsilons = [h["epsilon"] for h in report["history"]]
    assert epsilons == sorted(epsilons) and len(epsilons) == 10


def test_no_step_beyond_the_budget(qa_dataset: Path, tmp_path: Path) -> None:
    pm = fresh_plugin_manager(autoload=True)
    config = dp_run_config(qa_dataset, tmp_path, target_epsilon=3.0, noise_multiplier=1.0)
    config.training.steps = 1000
    limit = RdpAccountant().max_steps(1.0, 8 / 36, DELTA, 3.0)
    orchestrator = TenSafeOrchestrator(config, plugin_manager=pm)
    with pytest.raises(PrivacyBudgetExceeded) as info:
        orchestrator.run(run_dir=tmp_path / "r")
    assert info.value.steps == limit
    assert info.value.epsilon <= 3.0 < info.value.would_be
    saved = json.loads((tmp_path / "r" / "checkpoint" / "progress.json").read_text())
    assert saved["step"] == limit
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["status"] == "failed" and "privacy budget reached" in report["error"]
    assert report["privacy"]["epsilon"] == info.value.epsilon

    # A restart from the checkpoint knows what was spent and refuses at once.
    again = TenSafeOrchestrator(config, plugin_manager=pm)
    with pytest.raises(PrivacyBudgetExceeded) as info_again:
        again.run(run_dir=tmp_path / "r", resume=True)
    assert info_again.value.steps == limit


def test_cli_reports_a_refused_step_with_exit_code_3(qa_dataset: Path, tmp_path: Path) -> None:
    from tests.core.test_plugins import run_cli

    path = tmp_path / "run.yaml"
    path.write_text(
        f"backend: bigram\noutput_dir: {tmp_path / 'runs'}\ndata: {{path: {qa_dataset}}}\n"
        "dp: {accountant: rdp, target_epsilon: 1.0, noise_multiplier: 0.8, target_delta: 0.001}\n"
        "training: {steps: 500, batch_size: 8}\n"
    )
    result = run_cli("run", str(path))
    assert result.returncode == 3
    assert "error: privacy budget reached" in result.stderr and "Traceback" not in result.stderr
