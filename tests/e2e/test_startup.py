"""With every distribution installed, listing plugins and commands stays import-light."""

from __future__ import annotations

import json
import os
import subprocess
import sys

SCRIPT = """
import json, sys
from click.testing import CliRunner
from tensafe.cli.main import cli
help_text = CliRunner().invoke(cli, ["--help"]).output
listing = CliRunner().invoke(cli, ["plugins"]).output
heavy = ("torch", "transformers", "peft", "opacus", "dp_accounting", "scipy", "cryptography", "Pyfhel")
print(json.dumps({"heavy": sorted(m for m in heavy if m in sys.modules), "help": help_text, "plugins": listing}))
"""


def test_help_and_plugins_import_no_heavy_library() -> None:
    env = {**os.environ, "TENSAFE_STRICT_PLUGINS": "1"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True, env=env)
    result = json.loads(out.stdout)
    assert result["heavy"] == []
    for command in ("privacy", "tgsp", "run", "inference"):
        assert f"  {command} " in result["help"]
    names = {row["name"] for row in json.loads(result["plugins"])}
    assert {"privacy", "torch", "tgsp"} <= names
