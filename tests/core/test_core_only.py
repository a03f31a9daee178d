"""tensafe-core on its own: useful errors, fast import, no heavy libraries."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.core.test_plugins import run_cli

CORE_ENV_SCRIPT = """
import json, sys
import tensafe, tensafe.cli.main, tensafe.config, tensafe.orchestrator
print(json.dumps(sorted(m for m in ("torch", "transformers", "Pyfhel", "numpy") if m in sys.modules)))
"""


def tensafe(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI with every entry-point plugin switched off: what a core-only install sees."""
    return run_cli(*args, env={"TENSAFE_LOAD_PLUGINS": ""})


def test_run_exits_2_naming_the_distribution_to_install() -> None:
    result = tensafe("run")
    assert result.returncode == 2
    expected = (
        "error: no ML backend 'torch' installed; python -m pip install ./tensafe-torch (from a TenSafe checkout) "
        "(available: none)"
    )
    assert result.stderr.strip() == expected


def test_inference_without_backend_names_the_distribution() -> None:
    result = tensafe("inference", "-p", "hello")
    assert result.returncode == 2 and "pip install ./tensafe-torch" in result.stderr


def test_plugins_lists_nothing_but_builtins() -> None:
    assert json.loads(tensafe("plugins").stdout) == []
    [builtin] = json.loads(tensafe("plugins", "--all").stdout)
    assert builtin["distribution"] == "tensafe-core" and builtin["provides"] == {
        "command": ["config"],
        "reward": ["exact_match", "numeric", "regex"],
    }


def test_core_imports_no_heavy_library() -> None:
    out = subprocess.run([sys.executable, "-c", CORE_ENV_SCRIPT], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []
