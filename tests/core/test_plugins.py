"""The plugin manager: built-ins, entry points, load failures and switches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tensafe import hookimpl
from tensafe.errors import PluginLoadError
from tensafe.plugins import PluginSettings, create_plugin_manager
from tests.mocks.distributions import BROKEN_MODULE, UNKNOWN_HOOK_MODULE, make_distribution


@pytest.fixture
def broken_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    site = make_distribution(
        tmp_path / "site", "tensafe-broken", "9.9.1", {"broken": "broken_plugin"}, {"broken_plugin": BROKEN_MODULE}
    )
    monkeypatch.syspath_prepend(str(site))
    return site


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TENSAFE_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "tensafe.cli.main", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=120,
        check=False,
    )


def test_builtin_plugin_is_registered_without_entry_points() -> None:
    pm = create_plugin_manager(settings=PluginSettings(autoload=False))
    assert "tensafe.builtin_plugin" in {name for name, _ in pm.list_name_plugin()}
    assert pm.registry.names("command") == ["config"]


def test_entry_point_plugins_load_with_their_distribution() -> None:
    pm = create_plugin_manager(settings=PluginSettings())
    assert pm.get_plugin("bigram") is not None
    assert pm.distribution_of("bigram") == ("tensafe-bigram", "0.1.0")


def test_allowlist_limits_loaded_entry_points() -> None:
    pm = create_plugin_manager(settings=PluginSettings(allowlist=frozenset({"nothing-by-this-name"})))
    assert pm.get_plugin("bigram") is None
    pm = create_plugin_manager(environ={"TENSAFE_LOAD_PLUGINS": "bigram"})
    assert pm.get_plugin("bigram") is not None


def test_autoload_switch_from_environment() -> None:
    pm = create_plugin_manager(environ={"TENSAFE_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert pm.get_plugin("bigram") is None


def test_failed_import_is_recorded_not_fatal(broken_site: Path) -> None:
    pm = create_plugin_manager(settings=PluginSettings())
    [failure] = pm.load_failures
    assert failure.name == "broken"
    assert (failure.distribution, failure.version) == ("tensafe-broken", "9.9.1")
    assert "libfoo" in failure.error and failure.error.startswith("ImportError")
    assert pm.get_plugin("bigram") is not None, "other plugins still load"


def test_strict_mode_makes_a_load_failure_fatal(broken_site: Path) -> None:
    with pytest.raises(PluginLoadError, match=r"'broken' \(from tensafe-broken 9.9.1\).*libfoo"):
        create_plugin_manager(settings=PluginSettings(strict=True))


def test_plugin_with_unknown_hook_is_dropped_and_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = make_distribution(
        tmp_path / "site", "tensafe-odd", "1.0", {"odd": "odd_plugin"}, {"odd_plugin": UNKNOWN_HOOK_MODULE}
    )
    monkeypatch.syspath_prepend(str(site))
    pm = create_plugin_manager(settings=PluginSettings())
    assert pm.get_plugin("odd") is None
    [failure] = pm.load_failures
    assert failure.name == "odd" and "tensafe_no_such_hook" in failure.error


def test_cli_lists_broken_plugin_and_other_commands_still_work(broken_site: Path) -> None:
    env = {"PYTHONPATH": str(broken_site)}
    listing = run_cli("plugins", env=env)
    assert listing.returncode == 0, listing.stderr
    rows = {row["name"]: row for row in json.loads(listing.stdout)}
    assert "libfoo" in rows["broken"]["error"]
    assert rows["broken"]["distribution"] == "tensafe-broken"
    assert rows["bigram"]["error"] is None
    assert rows["bigram"]["provides"] == {"ml_backend": ["bigram"]}
    assert "tensafe_register_ml_backends" in rows["bigram"]["hooks"]
    shown = run_cli("config", "show", "--format", "json", env=env)
    assert shown.returncode == 0 and json.loads(shown.stdout)["backend"] == "torch"


def test_cli_strict_mode_fails_cleanly(broken_site: Path) -> None:
    result = run_cli("plugins", env={"PYTHONPATH": str(broken_site), "TENSAFE_STRICT_PLUGINS": "1"})
    assert result.returncode == 2
    assert "libfoo" in result.stderr
    assert "Traceback" not in result.stderr


def test_tracing_writes_hook_calls_to_stderr() -> None:
    result = run_cli("plugins", env={"TENSAFE_TRACE_PLUGINS": "1"})
    assert result.returncode == 0
    assert "tensafe_register_ml_backends" in result.stderr


def test_plugins_all_includes_builtins() -> None:
    plain = {row["name"] for row in json.loads(run_cli("plugins").stdout)}
    everything = {row["name"] for row in json.loads(run_cli("plugins", "--all").stdout)}
    assert "tensafe.builtin_plugin" not in plain
    assert "tensafe.builtin_plugin" in everything


def test_hook_output_can_be_routed_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    class Chatty:
        @hookimpl
        def tensafe_report_step(self, step: int) -> None:
            print(f"hook says {step}")

    pm = create_plugin_manager(plugins=[Chatty()], settings=PluginSettings(autoload=False))
    pm.route_hook_output_to_stderr()
    pm.route_hook_output_to_stderr()  # idempotent
    pm.hook.tensafe_report_step(run_id="r", step=3, metrics={})
    print("caller says hi")
    out, err = capsys.readouterr()
    assert (out, err) == ("caller says hi\n", "hook says 3\n")
