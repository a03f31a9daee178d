"""Shared fixtures. Test doubles live in tests/mocks and are registered by tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

TENSAFE_ENV = (
    "TENSAFE_LOAD_PLUGINS",
    "TENSAFE_DISABLE_PLUGIN_AUTOLOAD",
    "TENSAFE_STRICT_PLUGINS",
    "TENSAFE_TRACE_PLUGINS",
)


@pytest.fixture(autouse=True)
def _clean_tensafe_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests choose their own plugin switches and config overrides."""
    import os

    for name in list(os.environ):
        if name in TENSAFE_ENV or name.startswith("TENSAFE_CONFIG__"):
            monkeypatch.delenv(name)


@pytest.fixture
def qa_dataset(tmp_path: Path) -> Path:
    """A small prompt/completion JSONL dataset."""
    colours = ["red", "blue", "green", "gold", "grey", "pink", "teal", "navy"]
    path = tmp_path / "qa.jsonl"
    with path.open("w", encoding="utf-8") as handle:
        for i in range(40):
            colour = colours[i % len(colours)]
            handle.write(json.dumps({"prompt": f"item {i}: colour?", "completion": f" {colour}"}) + "\n")
    return path
