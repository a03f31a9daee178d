"""DP-SGD in the torch backend, checked against independent computations."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tensafe import capabilities
from tensafe.errors import BackendError, PrivacyBudgetExceeded
from tensafe.orchestrator import TenSafeOrchestrator
from tensafe.testing import fresh_plugin_manager
from tensafe.types import AdamParams, Datum, datum_from_sequence
from tensafe_torch.backend import TorchBackend
from tests.mocks.accountants import LinearAccountantPlugin
from tests.torch.conftest import make_backend, torch_config

TEXTS = [
    "Record 12: the keeper of the lighthouse",
    "a short one",
    "Python evaluates expressions from left to right, except for assignment",
]


def data_for(backend: TorchBackend) -> list[Datum]:
    return [datum_from_sequence(backend.encode(text)) for text in TEXTS]


def flat_grad(backend: TorchBackend) -> torch.Tensor:
    return torch.cat([p.grad.detach().flatten().clone() for p in backend._params])


def perturb_lora_b(backend: TorchBackend) -> None:
    """Give LoRA B (initialised to zero) the same non-zero values in every backend, so A gets gradients too."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in zip(backend._names, backend._params, strict=True):
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def test_zero_noise_gradient_is_the_mean_of_per_example_clipped_gradients() -> None:
    clip, expected_batch = 0.05, 4
    private = make_backend(noise_multiplier=1e-12, max_grad_norm=clip)
    plain = make_backend()
    for backend in (private, plain):
        perturb_lora_b(backend)
    data = data_for(private)

    expected = torch.zeros(sum(p.numel() for p in private._params))
    norms = []
    for datum in data:  # each example's gradient on its own, in a non-private twin
        plain.forward_backward([datum], "cross_entropy")
        grad = flat_grad(plain)
        norms.append(float(grad.norm()))
        expected += grad * min(1.0, clip / float(grad.norm()))
        plain._clear_gradients()
    expected /= expected_batch
    assert min(norms) > clip, "every example is clipped, so the test checks clipping"

    private.forward_backward(data[:2], "cross_entropy")  # two physical micro-batches ...
    private.forward_backward(data[2:], "cross_entropy")  # ... make one logical batch
    private.optim_step(AdamParams(learning_rate=1e-9))
    torch.testing.assert_close(flat_grad(private), expected, rtol=1e-4, atol=1e-7)


def test_noise_standard_deviation_is_sigma_c_over_the_expected_batch() -> None:
    private = make_backend(noise_multiplier=1.5, max_grad_norm=0.8)
    private.optim_step(AdamParams())  # an empty Poisson batch: noise only
    noise = flat_grad(private)
    assert noise.numel() > 10_000
    assert float(noise.std()) == pytest.approx(1.5 * 0.8 / 4, rel=0.03)
    assert abs(float(noise.mean())) < 0.01


def test_base_weights_never_change_and_lora_weights_do() -> None:
    private = make_backend(noise_multiplier=1.0, max_grad_norm=1.0)
    state = {k: v.clone() for k, v in private._peft.state_dict().items()}
    for _ in range(3):
        private.forward_backward(data_for(private), "cross_entropy")
        private.optim_step(AdamParams(learning_rate=1e-2))
    after = private._peft.state_dict()
    base = [k for k in state if "lora_" not in k]
    lora = [k for k in state if "lora_" in k]
    assert base and lora
    assert all(torch.equal(state[k], after[k]) for k in base)
    assert all(not torch.equal(state[k], after[k]) for k in lora)


def test_dp_state_round_trip_continues_identically() -> None:
    first = make_backend(noise_multiplier=1.0, max_grad_norm=1.0)
    data = data_for(first)
    first.forward_backward(data, "cross_entropy")
    first.optim_step(AdamParams(learning_rate=1e-2))
    state = first.save_state()

    def continue_training(backend: TorchBackend) -> list[float]:
        losses = []
        for _ in range(2):
            losses.append(backend.forward_backward(data, "cross_entropy").metrics["loss:sum"])
            backend.optim_step(AdamParams(learning_rate=1e-2))
        return losses

    straight = continue_training(first)
    second = make_backend(noise_multiplier=1.0, max_grad_norm=1.0)
    assert second.load_state(state) == 1
    assert continue_training(second) == straight


def test_a_step_refused_at_the_budget_performs_no_update(qa_dataset: Path, tmp_path: Path) -> None:
    config = torch_config(
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        accountant="linear-test",
        target_epsilon=2.5 * 8 / 36,
        target_delta=1e-3,
    )
    config.data.path = qa_dataset
    config.training.batch_size = 8
    pm = fresh_plugin_manager(plugins=[LinearAccountantPlugin()], autoload=True)
    orchestrator = TenSafeOrchestrator(config, plugin_manager=pm)
    run = orchestrator.prepare()
    orchestrator.train_step(run)
    orchestrator.train_step(run)
    weights = [p.detach().clone() for p in run.backend._params]  # type: ignore[attr-defined]
    with pytest.raises(PrivacyBudgetExceeded):
        orchestrator.train_step(run)
    assert all(torch.equal(w, p) for w, p in zip(weights, run.backend._params, strict=True))  # type: ignore[attr-defined]
    assert run.step == 2


def test_noised_gradient_is_the_gradient_adamw_received() -> None:
    private = make_backend(noise_multiplier=1.0, max_grad_norm=0.5)
    assert capabilities.DP_PROBE in private.capabilities
    with pytest.raises(BackendError, match="no DP optim_step has run yet"):
        private.noised_gradient()
    private.forward_backward(data_for(private), "cross_entropy")
    private.optim_step(AdamParams(learning_rate=1e-2))
    probe = private.noised_gradient()
    assert len(probe) == sum(p.numel() for p in private._params)
    torch.testing.assert_close(torch.tensor(probe), flat_grad(private))
    private.load_state(private.save_state())
    with pytest.raises(BackendError, match="no DP optim_step has run yet"):
        private.noised_gradient()
    plain = make_backend()
    plain.optim_step(AdamParams())
    with pytest.raises(BackendError, match="needs DP-SGD"):
        plain.noised_gradient()


def test_noised_gradient_of_an_empty_step_has_std_sigma_c_over_the_expected_batch() -> None:
    private = make_backend(noise_multiplier=2.0, max_grad_norm=0.3)
    private.optim_step(AdamParams())
    noise = torch.tensor(private.noised_gradient())
    assert float(noise.std()) == pytest.approx(2.0 * 0.3 / 4, rel=0.05)
    assert abs(float(noise.mean())) < 0.01
