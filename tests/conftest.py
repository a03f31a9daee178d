"""Shared fixtures. Test doubles live in tests/mocks and are registered by tests."""

from __future__ import annotations

import itertools
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
    """A small prompt/completion JSONL dataset: 40 records, of which eval_fraction 0.1 holds out exactly 4.

    The split is decided per record by a hash of its content, so the records are
    chosen to give round numbers: 36 training records, 4 held out.
    """
    from tensafe.data import Record, held_out

    colours = ["red", "blue", "green", "gold", "grey", "pink", "teal", "navy"]
    path = tmp_path / "qa.jsonl"
    train = held = 0
    with path.open("w", encoding="utf-8") as handle:
        for i in itertools.count():
            prompt, completion = f"item {i}: colour?", f" {colours[i % len(colours)]}"
            if held_out(Record(prompt, completion), 0.1):
                if held == 4:
                    continue
                held += 1
            elif train < 36:
                train += 1
            else:
                continue
            handle.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
            if (train, held) == (36, 4):
                return path
    raise AssertionError("unreachable")
