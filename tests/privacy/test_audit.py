"""tensafe privacy audit: the one-run audit through the command line, with the bigram backend and real accountants.

An honest run's lower bound stays at or below its claimed epsilon; a backend
that adds no noise while the accountant charges as if it did is a VIOLATION;
a white-box audit at epsilon 8 certifies a good part of what its canaries can.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from tensafe.auditing import AuditSettings, audit
from tensafe.cli.main import cli
from tensafe.config import RunConfig
from tensafe.engine.ledger import AUDIT_VIOLATION, PrivacyCertificate
from tensafe.testing import fresh_plugin_manager
from tests.mocks.audit_backends import AuditBigrams


def write_config(tmp_path: Path, data: Path, backend: str = "bigram", **sections: dict[str, Any]) -> Path:
    config: dict[str, Any] = {
        "backend": backend,
        "output_dir": str(tmp_path / "runs"),
        "data": {"path": str(data)},
        "training": {"steps": 12, "batch_size": 12, "checkpoint_every": 0},
        "dp": {"target_epsilon": 4.0, "target_delta": 1e-5},
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def invoke(*args: str) -> tuple[int, str, str]:
    pm = fresh_plugin_manager(autoload=True, plugins=[AuditBigrams()])
    result = CliRunner().invoke(cli, list(args), obj={"pm": pm})
    return result.exit_code, result.stdout, result.stderr


def test_white_box_audit_of_an_honest_run_is_consistent(qa_dataset: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path, qa_dataset)
    code, out, err = invoke("privacy", "audit", str(config), "--mode", "white-box", "--canaries", "500", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["mode"] == "white-box" and summary["verdict"] == "consistent"
    assert summary["epsilon_lower_bound"] <= summary["claimed_epsilon"] <= 4.0
    assert (summary["canaries"], summary["guesses"], summary["confidence"]) == (500, 100, 0.95)
    assert summary["accountant"] == "rdp" and summary["steps"] == 12 and summary["delta"] == 1e-5
    assert 0 <= summary["correct"] <= 100 and summary["guesses_ceiling"] <= summary["ceiling"]
    assert "auditing (white-box, 500 canaries)" in err, "progress bar"
    assert not (tmp_path / "runs").exists(), "the audit writes no run"


def test_noise_disabled_while_the_accountant_charges_is_a_violation(qa_dataset: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path, qa_dataset, backend="bigram-noiseless", dp={"target_epsilon": 2.0})
    code, out, _ = invoke("privacy", "audit", str(config), "--mode", "white-box", "--json")
    assert code == 1, "a violation fails the command"
    summary = json.loads(out)
    assert summary["verdict"] == AUDIT_VIOLATION
    assert summary["epsilon_lower_bound"] > summary["claimed_epsilon"] > 1.9
    # An included canary that Poisson sampling never picked looks excluded: nearly, not always, every guess is right.
    assert summary["guesses"] == 200 and summary["correct"] >= 180


def test_black_box_audit_works_through_the_backend_contract(qa_dataset: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path, qa_dataset)
    code, out, err = invoke("privacy", "audit", str(config), "--canaries", "60", "--guesses", "20", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["mode"] == "black-box" and summary["verdict"] == "consistent"
    assert summary["epsilon_lower_bound"] <= summary["claimed_epsilon"]
    assert (summary["canaries"], summary["guesses"]) == (60, 20)


def test_white_box_audit_at_epsilon_8_certifies_a_good_part_of_what_its_canaries_can(
    qa_dataset: Path, tmp_path: Path
) -> None:
    # Every record in every batch (q = 1) for 4 steps: each canary is a Gaussian mechanism at epsilon 8, the
    # setting in which the one-run bound comes closest to its ceiling (docs/privacy.md, "Auditing").
    config = RunConfig.model_validate(
        {
            "backend": "bigram",
            "data": {"path": str(qa_dataset)},
            "training": {"steps": 4, "batch_size": 36},
            "dp": {"target_epsilon": 8.0, "target_delta": 1e-5, "accountant": "pld"},
        }
    )
    pm = fresh_plugin_manager(autoload=True)
    summary = audit(config, pm, AuditSettings(mode="white-box", canaries=1000)).summary
    fraction = summary.epsilon_lower_bound / summary.ceiling
    print(
        f"white-box audit at epsilon {summary.claimed_epsilon:.3f}: lower bound {summary.epsilon_lower_bound:.3f}, "
        f"{summary.correct}/{summary.guesses} right, ceiling for m = 1000 {summary.ceiling:.3f}: {fraction:.0%} of it"
    )
    assert summary.verdict == "consistent"
    assert fraction >= 0.35


def test_the_audit_is_written_into_the_run(qa_dataset: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path, qa_dataset)
    code, _, err = invoke("train", str(config), "--run-name", "r")
    assert code == 0, err
    run_dir = tmp_path / "runs" / "r"
    code, out, err = invoke("privacy", "audit", "--run-dir", str(run_dir), "--canaries", "60", "--guesses", "20")
    assert code == 0, err
    assert "written to:" in out
    report = json.loads((run_dir / "report.json").read_text())
    certificate = PrivacyCertificate.model_validate(report["privacy"])
    assert certificate.audited is not None and certificate.audited.mode == "black-box"
    released = [item for item in certificate.outside_guarantee if item.startswith("the privacy audit")]
    assert len(released) == 1 and "together" in released[0], "a black-box audit is a release about the records"
    assert "privacy audit (black-box" in (run_dir / "report.txt").read_text()

    # A white-box audit replaces it, and trains on no record, so it releases nothing about them.
    code, _, err = invoke("privacy", "audit", str(config), "--run-dir", str(run_dir), "--mode", "white-box")
    assert code == 0, err
    certificate = PrivacyCertificate.model_validate(json.loads((run_dir / "report.json").read_text())["privacy"])
    assert certificate.audited is not None and certificate.audited.mode == "white-box"
    assert not [item for item in certificate.outside_guarantee if item.startswith("the privacy audit")]

    other = write_config(tmp_path, qa_dataset, dp={"max_grad_norm": 0.5})
    code, _, err = invoke("privacy", "audit", str(other), "--run-dir", str(run_dir), "--mode", "white-box")
    assert code == 2 and "dp.max_grad_norm = 0.5" in err


@pytest.mark.parametrize(
    ("extra", "config_change", "message"),
    [
        (["--mode", "white-box"], {"backend": "bigram-canaryless"}, "'gradient_canaries'"),
        ([], {"dp": {"enabled": False}}, "nothing to audit"),
        (["--canaries", "10", "--guesses", "11"], {}, "guesses must be between 1 and the 10 canaries"),
        (["--mode", "white-box", "--canaries", "70000"], {}, "trains only 66049 parameters"),
        (["--confidence", "1"], {}, "--confidence"),
    ],
)
def test_bad_requests_exit_2_with_a_reason(
    qa_dataset: Path, tmp_path: Path, extra: list[str], config_change: dict[str, Any], message: str
) -> None:
    config = write_config(tmp_path, qa_dataset)
    data = yaml.safe_load(config.read_text())
    for key, value in config_change.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    config.write_text(yaml.safe_dump(data))
    code, _, err = invoke("privacy", "audit", str(config), *extra)
    assert code == 2, err
    assert message in err
