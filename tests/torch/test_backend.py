"""The torch backend's losses, sampling, adapters and errors."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from tensafe.errors import BackendError, UsageError
from tensafe.types import AdamParams, Datum, SamplingParams, datum_from_sequence
from tensafe_torch import assets
from tensafe_torch.backend import TorchBackend
from tests.torch.conftest import make_backend, torch_config

PROMPT = "The meaning of"


def policy_datum(backend: TorchBackend, advantage: float, shift: float = 0.0) -> Datum:
    tokens = backend.encode("Python evaluates expressions from left to right")
    base = datum_from_sequence(tokens)
    current = backend.forward([base], "cross_entropy").loss_fn_outputs[0]["logprobs"]
    n = len(base.model_input)
    return Datum(
        model_input=base.model_input,
        loss_fn_inputs={
            "target_tokens": base.target_tokens,
            "logprobs": [lp - shift for lp in current],
            "advantages": [advantage] * n,
        },
    )


def grads(backend: TorchBackend) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in backend._params])


def warmed() -> TorchBackend:
    backend = make_backend()
    backend.forward_backward([datum_from_sequence(backend.encode("warm up the adapter"))], "cross_entropy")
    backend.optim_step(AdamParams(learning_rate=1e-2))
    backend._clear_gradients()
    return backend


def test_flipping_the_advantage_sign_flips_the_gradient() -> None:
    up, down = warmed(), warmed()
    up.forward_backward([policy_datum(up, 1.0)], "importance_sampling")
    down.forward_backward([policy_datum(down, -1.0)], "importance_sampling")
    assert float(grads(up).norm()) > 0
    torch.testing.assert_close(grads(up), -grads(down))


def test_zero_advantages_give_zero_policy_gradient() -> None:
    backend = warmed()
    backend.forward_backward([policy_datum(backend, 0.0)], "ppo")
    assert float(grads(backend).abs().max()) == 0.0


def test_ppo_clips_the_ratio() -> None:
    backend = warmed()
    # Sampler logprobs log(2) lower: ratio 2 > 1.2, so positive advantages are clipped and give no gradient.
    out = backend.forward_backward([policy_datum(backend, 1.0, shift=math.log(2))], "ppo")
    assert out.metrics["clip_fraction"] == pytest.approx(1.0)
    assert out.metrics["ratio_mean"] == pytest.approx(2.0, rel=1e-4)
    assert float(grads(backend).abs().max()) == 0.0
    backend._clear_gradients()
    out = backend.forward_backward([policy_datum(backend, -1.0, shift=math.log(2))], "ppo")
    assert float(grads(backend).abs().max()) > 0, "negative advantages are not clipped from above"


def test_policy_loss_needs_its_inputs() -> None:
    backend = make_backend()
    with pytest.raises(BackendError, match="needs loss_fn_inputs"):
        backend.forward_backward([datum_from_sequence(backend.encode("abc def"))], "ppo")


def test_exported_adapter_loads_in_plain_peft_with_identical_logits(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    backend = warmed()
    backend.export_adapter(tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(str(assets.TINY_MODEL), local_files_only=True)
    plain = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    ids = torch.tensor([backend.encode("Python evaluates expressions")])
    backend._peft.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, backend._peft(input_ids=ids).logits)


def test_top_k_one_is_greedy_and_seeds_reproduce() -> None:
    backend = make_backend()
    prompt = backend.encode(PROMPT)
    greedy = backend.sample([prompt], SamplingParams(max_tokens=10, temperature=0))[0].sequences[0]
    top1 = backend.sample([prompt], SamplingParams(max_tokens=10, temperature=0.7, top_k=1, seed=3))[0].sequences[0]
    assert top1.tokens == greedy.tokens
    a = backend.sample([prompt], SamplingParams(max_tokens=10, seed=11), num_samples=3)[0]
    b = backend.sample([prompt], SamplingParams(max_tokens=10, seed=11), num_samples=3)[0]
    assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]


def test_stop_strings_and_stop_tokens() -> None:
    backend = make_backend()
    prompt = backend.encode(PROMPT)
    free = backend.sample([prompt], SamplingParams(max_tokens=20, temperature=0))[0].sequences[0]
    assert len(free.tokens) >= 3
    stop_token = free.tokens[2]
    stopped = backend.sample([prompt], SamplingParams(max_tokens=20, temperature=0, stop=[stop_token]))[0]
    assert stopped.sequences[0].tokens == free.tokens[: free.tokens.index(stop_token) + 1]
    assert stopped.sequences[0].stop_reason == "stop"
    word = free.text.strip().split()[0]
    by_text = backend.sample([prompt], SamplingParams(max_tokens=20, temperature=0, stop=word))[0].sequences[0]
    assert by_text.stop_reason == "stop" and word in by_text.text and len(by_text.tokens) <= len(free.tokens)


def test_streaming_yields_the_greedy_text() -> None:
    backend = make_backend()
    prompt = backend.encode(PROMPT)
    params = SamplingParams(max_tokens=12, temperature=0)
    whole = backend.sample([prompt], params)[0].sequences[0].text
    assert "".join(backend.sample_stream(prompt, params)) == whole


def test_bad_inputs_are_clear_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = make_backend()
    with pytest.raises(BackendError, match="outside the vocabulary"):
        backend.sample([[10**7]], SamplingParams(max_tokens=2))
    with pytest.raises(BackendError, match="empty prompt"):
        backend.sample([[]], SamplingParams(max_tokens=2))
    with pytest.raises(BackendError, match="cannot read training state"):
        backend.load_state(b"TENSAFE-TORCH-STATE\x01garbage")
    config = torch_config()
    config.model.path = "/nonexistent/model"
    with pytest.raises(UsageError, match="not a model directory"):
        TorchBackend().initialize_model(config)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config.model.path = "some-org/some-model"
    with pytest.raises(UsageError, match="not a local directory nor in the Hugging Face cache, and the hub is"):
        TorchBackend().initialize_model(config)
    with pytest.raises(BackendError, match="not initialised"):
        TorchBackend().encode("x")


def test_load_state_refuses_another_lora_configuration() -> None:
    state = make_backend().save_state()
    other = TorchBackend()
    config = torch_config()
    config.lora.rank = 2
    other.initialize_model(config)
    with pytest.raises(BackendError, match="another model or LoRA configuration"):
        other.load_state(state)


def names_and_record_numbers(path: Path) -> tuple[set[str], set[str]]:
    """Every first and last name, and every record number, of a dataset's prompts."""
    names: set[str] = set()
    numbers: set[str] = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        match = re.match(r"Record (\d+)\. Name: (\w+) (\w+)\.", json.loads(line)["prompt"])
        assert match, line
        numbers.add(match[1])
        names |= {match[2], match[3]}
    return names, numbers


def test_default_probes_are_public_prompts_in_the_default_dataset_format() -> None:
    probes = TorchBackend().default_probes()
    names, numbers = names_and_record_numbers(assets.DEFAULT_DATASET)
    assert len(probes) == 3
    for probe in probes:
        match = re.fullmatch(r"Record (\d+)\. Name: (\w+) (\w+)\. Born: \d{4}\. City: [\w ]+\. Country:", probe)
        assert match, probe
        assert match.group(1) not in numbers and not {match.group(2), match.group(3)} & names, "an invented person"


def test_the_rlvr_example_names_public_probes_in_its_data_format() -> None:
    from tensafe.config import load_config

    config = load_config(assets.HERE / "rlvr.yaml")
    assert config.data.path is not None and config.data.probes
    names, numbers = names_and_record_numbers(config.data.path)
    assert 2 <= len(config.data.probes) <= 3
    for probe in config.data.probes:
        match = re.fullmatch(r"Record (\d+)\. Name: (\w+) (\w+)\. Born: \d{4}\. Country: \w+\. City:", probe)
        assert match, probe
        assert match.group(1) not in numbers and not {match.group(2), match.group(3)} & names, "an invented person"


def test_a_hub_id_offline_fails_at_once_with_what_to_do() -> None:
    import subprocess
    import sys
    import time

    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "tensafe.cli.main", "inference", "--model", "acme/not-cached-7b", "-p", "hi"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "not a local directory nor in the Hugging Face cache" in result.stderr and "--model DIR" in result.stderr
    assert "Traceback" not in result.stderr and time.monotonic() - started < 60


def test_loading_opacus_adds_no_root_log_handler() -> None:
    import subprocess
    import sys

    script = (
        "import logging\n"
        "from tensafe.config import RunConfig\n"
        "from tensafe.testing import fresh_plugin_manager\n"
        "before = list(logging.getLogger().handlers)\n"
        "backend = fresh_plugin_manager(autoload=True).registry.ml_backend('torch')\n"
        "backend.initialize_model(RunConfig.model_validate({'dp': {'noise_multiplier': 1.0}}))\n"
        "assert logging.getLogger().handlers == before, logging.getLogger().handlers\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
