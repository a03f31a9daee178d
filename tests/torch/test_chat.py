"""Chat records ({"messages": [...]}) through the model's chat template, trained on assistant turns only."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tensafe.config import build_config
from tensafe.errors import UsageError
from tensafe.testing import fresh_plugin_manager
from tensafe_torch import assets
from tests.core.test_plugins import run_cli

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "Answer with the country."},
    {"role": "user", "content": "Record 17. Name: Ana Lee. City: Lyon."},
    {"role": "assistant", "content": " France"},
    {"role": "user", "content": "And Kyoto?"},
    {"role": "assistant", "content": " Japan"},
]


@pytest.fixture
def chat_model(tmp_path: Path) -> Path:
    """The embedded model with a chat template added to its tokenizer config."""
    model = tmp_path / "chat-model"
    shutil.copytree(assets.TINY_MODEL, model)
    config = model / "tokenizer_config.json"
    data = json.loads(config.read_text())
    data["chat_template"] = TEMPLATE
    config.write_text(json.dumps(data))
    return model


def backend_for(model: Path | None):  # type: ignore[no-untyped-def]
    backend = fresh_plugin_manager(autoload=True).registry.ml_backend("torch")
    path = {"path": str(model)} if model else {}
    backend.initialize_model(build_config({"model": path, "dp": {"enabled": False}}, environ={}))
    return backend


def test_only_assistant_text_is_marked_for_training(chat_model: Path) -> None:
    backend = backend_for(chat_model)
    tokens, assistant = backend.encode_chat(CONVERSATION)
    assert len(tokens) == len(assistant)
    marked = backend.decode([t for t, flag in zip(tokens, assistant, strict=True) if flag])
    assert marked.replace("\n", "").replace(" ", "") == "FranceJapan"
    assert "Lyon" not in marked and "Answer" not in marked


def test_a_model_without_a_chat_template_is_a_clear_error() -> None:
    with pytest.raises(UsageError, match="no chat template"):
        backend_for(None).encode_chat(CONVERSATION)


def test_tensafe_train_on_chat_records_from_the_command_line(chat_model: Path, tmp_path: Path) -> None:
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": CONVERSATION}) + "\n" for _ in range(12)))
    config = tmp_path / "c.yaml"
    config.write_text(
        f"output_dir: {tmp_path / 'runs'}\ndp:\n  enabled: false\ntraining:\n  batch_size: 4\n  checkpoint_every: 0\n"
    )
    result = run_cli(
        "train", str(config), "--model", str(chat_model), "--data", str(data), "--steps", "2", "--run-name", "r"
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "runs" / "r" / "report.json").read_text())
    assert report["steps"] == 2 and report["records"]["train"] + report["records"]["eval"] == 12

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    refused = run_cli("train", str(config), "--model", str(chat_model), "--data", str(bad), "--steps", "1")
    assert refused.returncode == 2 and "needs an assistant turn" in refused.stderr
