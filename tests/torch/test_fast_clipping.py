"""dp.clipping 'lora': per-sample gradients from the LoRA adapters' own backward pass, against Opacus' hooks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from pydantic import ValidationError
from safetensors.torch import load_file

from tensafe.cli.main import cli
from tensafe.config import DPConfig
from tensafe.errors import BackendError
from tensafe.testing import fresh_plugin_manager
from tensafe.types import Datum, datum_from_sequence
from tensafe_torch.backend import TorchBackend
from tensafe_torch.lora_clipping import LoraPerSampleGradients
from tests.torch.conftest import make_backend
from tests.torch.test_dp import perturb_lora_b

TEXTS = [
    "Record 12: the keeper of the lighthouse",
    "a short one",
    "Python evaluates expressions from left to right, except for assignment",
    "ok",
    "The tide tables for the northern harbour are printed every spring",
]


def weighted_data(backend: TorchBackend) -> list[Datum]:
    """Data of different lengths (so the batch is padded), with a prompt of weight 0 and uneven weights."""
    data = []
    for index, text in enumerate(TEXTS):
        tokens = [*backend.encode(text), 0]
        datum = datum_from_sequence(tokens, prompt_length=min(2, len(tokens) - 1))
        weights = [w * (0.5 + index) for w in datum.loss_fn_inputs["weights"]]
        data.append(Datum(model_input=datum.model_input, loss_fn_inputs={**datum.loss_fn_inputs, "weights": weights}))
    return data


def per_datum_norms(data: list[Datum]) -> list[float]:
    """Each datum's unclipped gradient norm, from a non-private twin taking it alone."""
    plain = make_backend()
    perturb_lora_b(plain)
    norms = []
    for datum in data:
        plain.forward_backward([datum], "cross_entropy")
        norms.append(float(torch.cat([p.grad.flatten() for p in plain._params]).norm()))
        plain._clear_gradients()
    return norms


def clipped_sum(backend: TorchBackend) -> torch.Tensor:
    return torch.cat([p.summed_grad.flatten() for p in backend._params])


def assert_same_up_to_rounding(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal but for float32 rounding: the two paths add the same products in different orders."""
    assert float(expected.norm()) > 0
    assert float((actual - expected).norm()) <= 1e-5 * float(expected.norm())


def test_auto_picks_the_lora_path_when_only_lora_weights_train() -> None:
    assert make_backend(noise_multiplier=1.0).dp_clipping == "lora"
    assert make_backend(noise_multiplier=1.0, clipping="hooks").dp_clipping == "hooks"
    assert make_backend().dp_clipping is None


def test_an_unknown_clipping_is_refused_with_the_choices() -> None:
    with pytest.raises(ValidationError, match="'auto', 'hooks' or 'lora'"):
        DPConfig(noise_multiplier=1.0, clipping="ghost")


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_the_lora_path_clips_and_sums_as_the_hooks_do(micro_batches: int) -> None:
    hooks = make_backend(noise_multiplier=1e-12, clipping="hooks")
    data = weighted_data(hooks)
    norms = per_datum_norms(data)
    clip = sorted(norms)[len(norms) // 2]  # the median: some data are clipped, some are not
    assert min(norms) < clip < max(norms)
    sums = []
    for mode in ("hooks", "lora"):
        backend = make_backend(noise_multiplier=1e-12, max_grad_norm=clip, clipping=mode)
        assert backend.dp_clipping == mode
        perturb_lora_b(backend)
        split = len(data) // micro_batches + 1
        for start in range(0, len(data), split):
            backend.forward_backward(data[start : start + split], "cross_entropy")
        sums.append(clipped_sum(backend))
    assert_same_up_to_rounding(sums[1], sums[0])


def test_the_lora_path_matches_the_hooks_for_a_policy_loss() -> None:
    sums = []
    for mode in ("hooks", "lora"):
        backend = make_backend(noise_multiplier=1e-12, max_grad_norm=0.01, clipping=mode)
        perturb_lora_b(backend)
        data = [
            Datum(
                model_input=d.model_input,
                loss_fn_inputs={
                    "target_tokens": d.loss_fn_inputs["target_tokens"],
                    "logprobs": [-1.5] * len(d.model_input),
                    "advantages": [(-1.0) ** i for i in range(len(d.model_input))],
                },
            )
            for d in weighted_data(backend)
        ]
        backend.forward_backward(data, "ppo")
        sums.append(clipped_sum(backend))
    assert_same_up_to_rounding(sums[1], sums[0])


def test_each_datum_adds_at_most_the_clipping_norm_and_data_do_not_mix() -> None:
    clip = 0.02
    backend = make_backend(noise_multiplier=1e-12, max_grad_norm=clip, clipping="lora")
    perturb_lora_b(backend)
    data = weighted_data(backend)
    alone = []
    for datum in data:
        backend.forward_backward([datum], "cross_entropy")
        alone.append(clipped_sum(backend).clone())
        backend._clear_gradients()
    norms = [float(c.norm()) for c in alone]
    assert max(norms) <= clip * (1 + 1e-5)
    assert min(norms) > 0.99 * clip, "every datum's gradient exceeds the norm here, so each is clipped to it"
    backend.forward_backward(data, "cross_entropy")  # padded together: the same contributions, summed
    assert_same_up_to_rounding(clipped_sum(backend), torch.stack(alone).sum(dim=0))


def test_evaluation_and_sampling_see_the_same_model_on_both_paths() -> None:
    outputs = []
    for mode in ("hooks", "lora"):
        backend = make_backend(noise_multiplier=1.0, clipping=mode)
        perturb_lora_b(backend)
        data = weighted_data(backend)
        logprobs = backend.forward(data, "cross_entropy").loss_fn_outputs[0]["logprobs"]
        outputs.append(logprobs)
    assert outputs[0] == pytest.approx(outputs[1], abs=1e-6)


def test_the_lora_path_refuses_a_trainable_parameter_that_is_no_lora_weight() -> None:
    backend = make_backend(noise_multiplier=1.0)
    embedding = backend._peft.get_input_embeddings().weight
    names, params = [*backend._names, "embed_tokens.weight"], [*backend._params, embedding]
    with pytest.raises(BackendError, match=r"plain LoRA A or B weight.*embed_tokens\.weight.*'hooks'"):
        LoraPerSampleGradients(backend._peft, names, params)


def run_with(clipping: str, dataset: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    config = tmp_path / f"{clipping}.yaml"
    config.write_text(
        f"backend: torch\noutput_dir: {tmp_path / 'runs'}\ndata: {{path: {dataset}}}\n"
        "lora: {rank: 4, seed: 0}\n"
        "dp: {noise_multiplier: 1.0, target_epsilon: 50, max_grad_norm: 0.5, secure_rng: false, "
        f"clipping: {clipping}}}\n"
        "training: {steps: 3, batch_size: 8, seed: 0, checkpoint_every: 0}\n"
        "optimizer: {learning_rate: 0.01}\nsampling: {max_tokens: 2, temperature: 0}\n"
    )
    result = CliRunner().invoke(
        cli, ["run", str(config), "--run-name", clipping], obj={"pm": fresh_plugin_manager(autoload=True)}
    )
    assert result.exit_code == 0, result.output
    return load_file(str(tmp_path / "runs" / clipping / "adapter" / "adapter_model.safetensors"))


def test_tensafe_run_trains_through_the_lora_path_as_through_the_hooks(qa_dataset: Path, tmp_path: Path) -> None:
    lora, hooks = run_with("lora", qa_dataset, tmp_path), run_with("hooks", qa_dataset, tmp_path)
    assert set(lora) == set(hooks)
    assert any(float(t.abs().max()) > 0 for name, t in lora.items() if "lora_B" in name), "the adapter trained"
    for name, tensor in lora.items():  # the same sampled batches and noise: the same adapter
        torch.testing.assert_close(tensor, hooks[name], rtol=1e-4, atol=1e-6)
