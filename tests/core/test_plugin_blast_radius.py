"""One plugin's bad registration or failing factory, seen through the CLI: it is named, and nothing else breaks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.core.test_plugins import run_cli
from tests.mocks.distributions import make_distribution
from tests.mocks.misbehaving_plugins import FAILING_FACTORIES, PRINTING_OBSERVER, TWIN_A, TWIN_B, WRONG_CLASSES


def install(root: Path, name: str, module: str, source: str) -> Path:
    """A throw-away distribution ``name`` (version 1.0) whose entry point ``module`` holds ``source``."""
    return make_distribution(root / name, name, "1.0", {module: module}, {module: source})


def path_env(*sites: Path, **extra: str) -> dict[str, str]:
    entries = [str(site) for site in sites] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {"PYTHONPATH": os.pathsep.join(entries), **extra}


@pytest.fixture
def twins(tmp_path: Path) -> dict[str, str]:
    """Two distributions that both register the accountant ``twin``, each with one name of its own."""
    return path_env(
        install(tmp_path, "tensafe-twin-a", "twin_a", TWIN_A), install(tmp_path, "tensafe-twin-b", "twin_b", TWIN_B)
    )


def run_config(tmp_path: Path, dataset: Path, *, accountant: str | None, backend: str = "bigram") -> Path:
    """Two steps on ``backend``; DP-SGD with ``accountant`` at noise multiplier 1, or no DP when it is None."""
    dp = (
        f"dp:\n  accountant: {accountant}\n  noise_multiplier: 1.0\n  target_epsilon: null\n"
        if accountant
        else "dp:\n  enabled: false\n"
    )
    path = tmp_path / "run.yaml"
    path.write_text(
        f"backend: {backend}\noutput_dir: {tmp_path / 'runs'}\ndata:\n  path: {dataset}\n{dp}"
        "training:\n  steps: 2\n  batch_size: 4\nsampling:\n  max_tokens: 4\n  temperature: 0\n"
    )
    return path


def test_a_duplicate_name_does_not_disable_other_plugins_accountants(
    twins: dict[str, str], qa_dataset: Path, tmp_path: Path
) -> None:
    result = run_cli("train", str(run_config(tmp_path, qa_dataset, accountant="linear-b")), "--json", env=twins)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["steps"] == 2
    [warning] = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert "accountant 'twin'" in warning
    assert "plugin 'twin_a' (tensafe-twin-a 1.0)" in warning and "plugin 'twin_b' (tensafe-twin-b 1.0)" in warning


def test_naming_a_duplicated_name_is_an_error_naming_every_plugin(
    twins: dict[str, str], qa_dataset: Path, tmp_path: Path
) -> None:
    result = run_cli("train", str(run_config(tmp_path, qa_dataset, accountant="twin")), env=twins)
    assert result.returncode == 2
    [error] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "privacy accountant 'twin' is registered by" in error and "none of them is used" in error
    assert "tensafe-twin-a 1.0" in error and "tensafe-twin-b 1.0" in error
    assert "Traceback" not in result.stderr


def test_strict_mode_fails_any_command_naming_the_duplicate(twins: dict[str, str]) -> None:
    result = run_cli("config", "show", env={**twins, "TENSAFE_STRICT_PLUGINS": "1"})
    assert result.returncode == 2
    assert "privacy accountant 'twin'" in result.stderr and "tensafe-twin-a" in result.stderr
    assert "Traceback" not in result.stderr


def test_plugins_attributes_each_error_to_the_plugin_at_fault(twins: dict[str, str]) -> None:
    result = run_cli("plugins", env=twins)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert all(row["name"] is not None for row in rows), rows
    failed = {row["name"]: row for row in rows if row["error"] is not None}
    assert set(failed) == {"twin_a", "twin_b"}
    assert failed["twin_a"]["distribution"] == "tensafe-twin-a" and "'twin'" in failed["twin_a"]["error"]
    # One row per plugin: the dropped registration is reported on the row of the plugin that still provides the rest.
    assert len([row for row in rows if row["name"] == "twin_a"]) == 1
    assert failed["twin_a"]["provides"] == {"accountant": ["linear-a"]}
    assert failed["twin_b"]["provides"] == {"accountant": ["linear-b"]}


def test_plugins_exits_non_zero_in_strict_mode_when_a_registration_failed(twins: dict[str, str]) -> None:
    result = run_cli("plugins", env={**twins, "TENSAFE_STRICT_PLUGINS": "1"})
    assert result.returncode == 2
    assert "'twin'" in result.stderr and "Traceback" not in result.stderr


def test_wrong_and_abstract_classes_are_dropped_alone(tmp_path: Path, qa_dataset: Path) -> None:
    env = path_env(install(tmp_path, "tensafe-sloppy", "sloppy", WRONG_CLASSES))
    result = run_cli("train", str(run_config(tmp_path, qa_dataset, accountant="sound")), "--json", env=env)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2
    assert all("plugin 'sloppy' (tensafe-sloppy 1.0)" in line for line in warnings)
    assert any("'dict'" in line and "not a PrivacyAccountant" in line for line in warnings)
    assert any("'half'" in line and "does not implement" in line for line in warnings)

    named = run_cli("train", str(run_config(tmp_path, qa_dataset, accountant="half")), env=env)
    assert named.returncode == 2
    assert "'half' from plugin 'sloppy' (tensafe-sloppy 1.0) does not implement" in named.stderr


def test_a_missing_lazy_import_in_a_factory_names_the_plugin(tmp_path: Path, qa_dataset: Path) -> None:
    env = path_env(install(tmp_path, "tensafe-fragile", "fragile", FAILING_FACTORIES))
    result = run_cli("train", str(run_config(tmp_path, qa_dataset, accountant=None, backend="lazy")), env=env)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert (
        "ML backend 'lazy' from plugin 'fragile' (tensafe-fragile 1.0) could not be created: "
        "ModuleNotFoundError: No module named 'tensafe_no_such_dependency'"
    ) in result.stderr


def test_a_constructor_that_raises_names_the_plugin(tmp_path: Path, qa_dataset: Path) -> None:
    env = path_env(install(tmp_path, "tensafe-fragile", "fragile", FAILING_FACTORIES))
    result = run_cli("train", str(run_config(tmp_path, qa_dataset, accountant="exploding")), env=env)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert (
        "privacy accountant 'exploding' from plugin 'fragile' (tensafe-fragile 1.0) could not be created: "
        "RuntimeError: the accountant's licence server is unreachable"
    ) in result.stderr


def test_a_hook_that_prints_does_not_break_json_output(tmp_path: Path, qa_dataset: Path) -> None:
    env = path_env(install(tmp_path, "tensafe-chatty", "chatty", PRINTING_OBSERVER))
    result = run_cli("train", str(run_config(tmp_path, qa_dataset, accountant=None)), "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["steps"] == 2
    assert "observer: step 2" in result.stderr and "observer: finished" in result.stderr
