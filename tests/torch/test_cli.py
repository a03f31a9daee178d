"""`tensafe inference` through the torch backend: streamed text, adapters, default (DP) config."""

from __future__ import annotations

from pathlib import Path

from tensafe.types import AdamParams, SamplingParams, datum_from_sequence
from tests.core.test_plugins import run_cli
from tests.torch.conftest import make_backend

PROMPT = "Record 7. Name: Ada Costa. Born: 1950. City: Lyon. Country:"


def test_inference_streams_the_adapter_s_greedy_text(tmp_path: Path) -> None:
    backend = make_backend()
    data = [datum_from_sequence(backend.encode(PROMPT + " France (FR)."), len(backend.encode(PROMPT)))]
    for _ in range(5):
        backend.forward_backward(data, "cross_entropy")
        backend.optim_step(AdamParams(learning_rate=2e-2))
    backend.export_adapter(tmp_path / "adapter")
    expected = backend.sample([backend.encode(PROMPT)], SamplingParams(max_tokens=8, temperature=0))[0]

    # The default config has DP on; inference must not need a noise multiplier or an accountant.
    result = run_cli(
        "inference", "-p", PROMPT, "--adapter", str(tmp_path / "adapter"), "--max-tokens", "8", "--temperature", "0"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == PROMPT + expected.sequences[0].text + "\n"
    assert "Warning" not in result.stderr


def test_inference_errors_are_one_line(tmp_path: Path) -> None:
    result = run_cli("inference", "-p", "x", "--adapter", str(tmp_path / "absent"))
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: adapter not found")
    assert result.stdout == ""
