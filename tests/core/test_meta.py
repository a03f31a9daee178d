"""Checks on the project itself: documented hooks, tested hooks, nothing fake under src/."""

from __future__ import annotations

import ast
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tensafe import hookspecs
from tests.mocks.distributions import HEAVY_IMPORT_CHECK

ROOT = Path(__file__).resolve().parents[2]
HOOKS = sorted(name for name in vars(hookspecs) if name.startswith("tensafe_"))


def signature_text(name: str) -> str:
    sig = inspect.signature(getattr(hookspecs, name))
    params = ", ".join(f"{p.name}: {p.annotation}" for p in sig.parameters.values())
    return f"{name}({params}) -> {sig.return_annotation}"


def test_there_are_hooks_to_check() -> None:
    assert len(HOOKS) >= 11


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented_with_its_exact_signature(hook: str) -> None:
    docs = (ROOT / "docs" / "hooks.md").read_text()
    assert f"### {hook}\n" in docs, f"docs/hooks.md has no section for {hook}"
    assert signature_text(hook) in docs, f"docs/hooks.md does not show {signature_text(hook)}"
    assert getattr(hookspecs, hook).__doc__, f"{hook} has no docstring"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_a_test(hook: str) -> None:
    tests = [p for p in (ROOT / "tests").rglob("*.py") if p.name != "test_meta.py"]
    assert any(hook in p.read_text() for p in tests), f"no test or test double uses {hook}"


SUSPECT = re.compile(r"mock|stub|fake|dummy|placeholder|simulat|fallback", re.IGNORECASE)


def test_no_src_tree_contains_test_doubles() -> None:
    src_trees = [p for p in ROOT.glob("*/src") if p.is_dir()] + [
        p for p in (ROOT / "tests" / "plugins").glob("*/src") if p.is_dir()
    ]
    assert src_trees, "found no src trees"
    offenders = []
    for tree in src_trees:
        for path in tree.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and SUSPECT.search(
                    node.name
                ):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not offenders, offenders


def test_loading_every_plugin_imports_no_heavy_library() -> None:
    env = {**os.environ, "TENSAFE_STRICT_PLUGINS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", HEAVY_IMPORT_CHECK], capture_output=True, text=True, check=True, env=env
    )
    report = json.loads(result.stdout)
    assert report["heavy"] == [], report
    assert "bigram" in report["plugins"]
