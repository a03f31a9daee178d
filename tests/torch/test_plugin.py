"""tensafe-torch shows up as a plugin, and loading it imports no heavy library."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.core.test_plugins import run_cli


def test_it_shows_up_in_tensafe_plugins() -> None:
    result = run_cli("plugins", env={"TENSAFE_STRICT_PLUGINS": "1"})
    assert result.returncode == 0, result.stderr
    [row] = [r for r in json.loads(result.stdout) if r["name"] == "torch"]
    assert row["distribution"] == "tensafe-torch"
    assert row["provides"] == {"ml_backend": ["torch"]}


def test_plugin_module_does_not_import_torch() -> None:
    code = "import sys, tensafe_torch.plugin; print([m for m in ('torch', 'transformers', 'peft') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
