"""tensafe-he-seal shows up as a plugin, registers 'seal-ckks', and its plugin module imports nothing heavy."""

from __future__ import annotations

import json
import subprocess
import sys

from tensafe.interfaces import HEBackend
from tensafe.testing import fresh_plugin_manager
from tests.core.test_plugins import run_cli


def test_it_shows_up_in_tensafe_plugins() -> None:
    result = run_cli("plugins", env={"TENSAFE_STRICT_PLUGINS": "1"})
    assert result.returncode == 0, result.stderr
    [row] = [r for r in json.loads(result.stdout) if r["name"] == "he_seal"]
    assert row["distribution"] == "tensafe-he-seal"
    assert row["provides"] == {"he_backend": ["seal-ckks"], "command": ["he"]}


def test_its_plugin_module_imports_nothing_heavy() -> None:
    code = (
        "import sys, tensafe_he_seal, tensafe_he_seal.plugin\n"
        "print(sorted(m for m in ('Pyfhel', 'numpy', 'tensafe_he_seal.backend') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_registered_backend_is_an_he_backend() -> None:
    from tensafe_he_seal.backend import SealCKKSBackend

    backend = fresh_plugin_manager(autoload=True).registry.he_backend("seal-ckks")
    assert isinstance(backend, SealCKKSBackend) and isinstance(backend, HEBackend)
