"""tensafe-tgsp shows up as a plugin and registers its loader and command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tensafe.interfaces import TGSPLoader
from tensafe.testing import fresh_plugin_manager
from tests.core.test_plugins import run_cli
from tests.tgsp.helpers import Party


def test_it_shows_up_in_tensafe_plugins() -> None:
    result = run_cli("plugins", env={"TENSAFE_STRICT_PLUGINS": "1"})
    assert result.returncode == 0, result.stderr
    [row] = [r for r in json.loads(result.stdout) if r["name"] == "tgsp"]
    assert row["distribution"] == "tensafe-tgsp"
    assert row["provides"] == {"tgsp_loader": ["tgsp"], "command": ["tgsp"]}


def test_its_plugin_module_imports_nothing_heavy() -> None:
    code = (
        "import sys, tensafe_tgsp, tensafe_tgsp.plugin\n"
        "print(sorted(m for m in ('cryptography', 'safetensors', 'click', 'tensafe_tgsp.format') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_registered_loader_is_a_tgsp_loader_that_works(
    package: Path, producer: Party, customer: Party, files: dict[str, bytes], tmp_path: Path
) -> None:
    from tensafe_tgsp.loader import TGSPPackageLoader

    loader = fresh_plugin_manager(autoload=True).registry.tgsp_loader("tgsp")
    assert isinstance(loader, TGSPPackageLoader) and isinstance(loader, TGSPLoader)
    assert loader.inspect(package)["base_model"]["id"] == "tiny-base"
    assert loader.verify(package, [producer.sign_pub])["privacy_certificate"]["epsilon"] == 2.9731
    manifest = loader.load(
        package, recipient_key=customer.recipient_key, trusted_signers=[producer.sign_pub], destination=tmp_path / "out"
    )
    assert {p: (tmp_path / "out" / p).read_bytes() for p in files} == files
    assert [f["path"] for f in manifest["files"]] == sorted(files)
