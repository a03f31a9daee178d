"""Builds throw-away installed distributions (a .dist-info folder plus modules) on disk.

Adding the folder to ``sys.path`` (or ``PYTHONPATH``) makes them discoverable
through entry points exactly like pip-installed ones.
"""

from __future__ import annotations

from pathlib import Path


def make_distribution(
    root: Path, name: str, version: str, entry_points: dict[str, str], modules: dict[str, str]
) -> Path:
    """Write modules and a dist-info with ``tensafe`` entry points under ``root``; returns ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    for module, source in modules.items():
        (root / f"{module}.py").write_text(source, encoding="utf-8")
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n", encoding="utf-8")
    lines = ["[tensafe]"] + [f"{ep} = {target}" for ep, target in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (info / "RECORD").write_text("", encoding="utf-8")
    return root


BROKEN_MODULE = "raise ImportError('this plugin needs libfoo, which is not installed')\n"

UNKNOWN_HOOK_MODULE = """
from tensafe import hookimpl

@hookimpl
def tensafe_no_such_hook():
    pass
"""

HEAVY_IMPORT_CHECK = """
import json, sys
from tensafe.plugins import create_plugin_manager
pm = create_plugin_manager()
for kind in ("ml_backend", "he_backend", "accountant", "tgsp_loader", "reward", "command"):
    pm.registry.registrations(kind)
heavy = sorted(m for m in ("torch", "transformers", "peft", "opacus", "Pyfhel", "tenseal") if m in sys.modules)
print(json.dumps({"heavy": heavy, "plugins": sorted(n for n, _ in pm.list_name_plugin())}))
"""
