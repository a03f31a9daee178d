"""tensafe-privacy shows up as a plugin and registers its accountants and command."""

from __future__ import annotations

import json

from tests.core.test_plugins import run_cli


def test_it_shows_up_in_tensafe_plugins() -> None:
    result = run_cli("plugins", env={"TENSAFE_STRICT_PLUGINS": "1"})
    assert result.returncode == 0, result.stderr
    [row] = [r for r in json.loads(result.stdout) if r["name"] == "privacy"]
    assert row["distribution"] == "tensafe-privacy"
    assert row["provides"] == {"accountant": ["pld", "prv", "rdp"], "command": ["privacy"]}


def test_its_plugin_module_imports_nothing_heavy() -> None:
    import subprocess
    import sys

    code = (
        "import sys, tensafe_privacy.plugin\n"
        "print(sorted(m for m in ('dp_accounting', 'numpy', 'scipy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
