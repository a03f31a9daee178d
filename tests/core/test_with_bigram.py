"""Checks that need the third-party bigram plugin installed (the `core` session; `core_only` has none)."""

from __future__ import annotations

from pathlib import Path

from tests.core.test_plugins import run_cli
from tests.core.test_registry import lenient_plugin_manager
from tests.mocks.registrations import ExplodingRegistrar, NamedRegistrar


def test_validate_checks_that_every_named_implementation_is_installed(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(
        "mode: rlvr\nbackend: jax\ndp:\n  accountant: gdp\nhe:\n  backend: tfhe\ntgsp:\n  loader: zip\n"
        "rl:\n  rewards:\n    - name: exact_match\n    - name: not_registered\n"
        "    - name: no_such_package.rewards:score\n"
    )
    result = run_cli("config", "validate", str(path))
    assert result.returncode == 2
    problems = dict(line.strip().split(": ", 1) for line in result.stderr.splitlines() if line.startswith("  "))
    assert set(problems) == {
        "backend",
        "dp.accountant",
        "he.backend",
        "tgsp.loader",
        "rl.rewards.1.name",
        "rl.rewards.2.name",
    }
    assert problems["backend"].startswith("no ML backend 'jax' installed (available: ")
    assert "bigram" in problems["backend"]
    assert "no privacy accountant 'gdp' installed" in problems["dp.accountant"]
    assert "no reward function 'not_registered' installed (available: exact_match" in problems["rl.rewards.1.name"]
    assert "no module named 'no_such_package" in problems["rl.rewards.2.name"].lower()
    assert "Traceback" not in result.stderr


def test_validate_passes_a_config_whose_implementations_are_installed(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("backend: bigram\ndp:\n  enabled: false\n  accountant: unused-without-dp\n")
    result = run_cli("config", "validate", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{path}: valid\n"


def test_a_registration_hook_that_raises_is_dropped_and_others_still_work() -> None:
    from tensafe_bigram.backend import BigramBackend

    pm = lenient_plugin_manager(
        ("exploding", ExplodingRegistrar()),
        ("bigram-plugin", NamedRegistrar("tensafe_register_ml_backends", "bigram", BigramBackend)),
    )
    assert pm.registry.names("ml_backend") == ["bigram"]
    [failure] = pm.load_failures
    assert failure.name == "exploding"
    assert "failed in tensafe_register_ml_backends: RuntimeError: boom; it registers nothing" in failure.error
