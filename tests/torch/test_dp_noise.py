"""Where the torch backend's DP noise comes from: never in a saved state, fresh on every resume, Opacus' secure mode."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from typing import Any

import pytest
import torch

from tensafe.errors import BackendError
from tensafe.types import AdamParams, datum_from_sequence
from tensafe_torch.backend import STATE_MAGIC, TorchBackend
from tensafe_torch.noise import MT_OFFSET, MT_STATE, csprng_generator, mt19937_init, os_random_normal
from tests.torch.conftest import make_backend

SIGMA, CLIP, EXPECTED_BATCH = 1.5, 0.8, 4  # the conftest config's training.batch_size is 4
NOISE_STD = SIGMA * CLIP / EXPECTED_BATCH


def dp_backend(**dp: Any) -> TorchBackend:
    return make_backend(noise_multiplier=SIGMA, max_grad_norm=CLIP, **dp)


def empty_step_noise(backend: TorchBackend) -> torch.Tensor:
    """The gradient of a step on an empty Poisson batch: noise only."""
    backend.optim_step(AdamParams(learning_rate=1e-3))
    return torch.tensor(backend.noised_gradient())


def trained(**dp: Any) -> TorchBackend:
    backend = dp_backend(**dp)
    backend.forward_backward([datum_from_sequence(backend.encode("a record to train on"))], "cross_entropy")
    backend.optim_step(AdamParams(learning_rate=1e-2))
    return backend


def resumed(state: bytes, **dp: Any) -> TorchBackend:
    backend = dp_backend(**dp)
    assert backend.load_state(state) == 1
    return backend


def state_parts(state: bytes) -> tuple[bytes, dict[str, torch.Tensor]]:
    """A saved state's magic and header, and its tensors by name."""
    from safetensors.torch import load

    (length,) = struct.unpack_from("<Q", state, len(STATE_MAGIC))
    end = len(STATE_MAGIC) + 8 + length
    return state[:end], load(state[end:])


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack((a, b)))[0, 1])


@pytest.mark.parametrize("secure_rng", [True, False])
def test_a_saved_state_holds_no_noise_generator_state(secure_rng: bool) -> None:
    _, tensors = state_parts(trained(secure_rng=secure_rng).save_state())
    assert "rng.noise" not in tensors
    assert all(name.startswith(("param.", "adam.")) or name == "rng.sampling" for name in tensors)


def test_resumes_of_one_state_draw_fresh_independent_noise() -> None:
    original = trained(secure_rng=True)
    state = original.save_state()
    first, second = resumed(state, secure_rng=True), resumed(state, secure_rng=True)
    draws = [empty_step_noise(b) for b in (first, second, original)]
    for i, j in ((0, 1), (0, 2), (1, 2)):
        assert abs(correlation(draws[i], draws[j])) < 0.05
    assert all(float(d.std()) == pytest.approx(NOISE_STD, rel=0.05) for d in draws)


def test_a_state_that_carries_noise_generator_state_is_refused() -> None:
    from safetensors.torch import save

    head, tensors = state_parts(trained(secure_rng=True).save_state())
    tensors["rng.noise"] = torch.Generator().manual_seed(3).get_state()  # what earlier versions wrote
    with pytest.raises(BackendError, match="noise-generator state are no longer accepted"):
        dp_backend(secure_rng=True).load_state(head + save(tensors))


def test_a_research_run_resumes_reproducibly_and_a_csprng_run_does_not() -> None:
    original = trained(secure_rng=False)
    state = original.save_state()
    first, second = resumed(state, secure_rng=False), resumed(state, secure_rng=False)
    draw = empty_step_noise(first)
    assert torch.equal(draw, empty_step_noise(second))
    assert torch.equal(draw, empty_step_noise(original)), "a resumed research run draws what the run would have"
    assert float(draw.std()) == pytest.approx(NOISE_STD, rel=0.05)

    csprng_state = trained(secure_rng=True).save_state()
    a, b = resumed(csprng_state, secure_rng=True), resumed(csprng_state, secure_rng=True)
    assert not torch.equal(empty_step_noise(a), empty_step_noise(b))


def test_research_noise_differs_from_step_to_step() -> None:
    backend = dp_backend(secure_rng=False)
    assert abs(correlation(empty_step_noise(backend), empty_step_noise(backend))) < 0.05


def test_secure_mode_changes_the_draw_and_keeps_the_std() -> None:
    plain = empty_step_noise(dp_backend(secure_rng=False))
    secure = empty_step_noise(dp_backend(secure_rng=False, secure_mode=True))
    assert torch.equal(secure, empty_step_noise(dp_backend(secure_rng=False, secure_mode=True)))  # same seed
    assert abs(correlation(plain, secure)) < 0.05
    assert float(secure.std()) == pytest.approx(NOISE_STD, rel=0.05)
    assert abs(float(secure.mean())) < 0.01


def test_secure_mode_with_secure_rng_draws_every_sample_from_the_os_csprng(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = dp_backend(secure_rng=True, secure_mode=True)
    drawn: list[int] = []
    urandom: Callable[[int], bytes] = os.urandom

    def counting(size: int) -> bytes:
        drawn.append(size)
        return urandom(size)

    monkeypatch.setattr(os, "urandom", counting)
    noise = empty_step_noise(backend)
    # Four 53-bit uniforms (eight bytes each) per noise value: the sum of four Gaussian samples.
    assert sum(drawn) >= 4 * 8 * noise.numel()
    assert float(noise.std()) == pytest.approx(NOISE_STD, rel=0.05)
    assert abs(float(noise.mean())) < 0.01


def test_the_cpu_noise_generator_state_is_not_a_32_bit_seed() -> None:
    # manual_seed fills MT19937's 624 words from the seed's low 32 bits: 2**32 guesses would find it.
    seeded = bytes(torch.Generator().manual_seed(2**40 + 7).get_state().tolist())
    assert MT_STATE.unpack_from(seeded, MT_OFFSET) == mt19937_init(7)
    states = [bytes(csprng_generator(torch.device("cpu")).get_state().tolist()) for _ in range(2)]
    words = [MT_STATE.unpack_from(state, MT_OFFSET) for state in states]
    assert words[0] != words[1]
    assert all(w != mt19937_init(w[0]) for w in words)
    assert all(max(w) < 2**32 and len(set(w)) == len(w) for w in words)


def test_os_random_normal_is_standard_normal() -> None:
    samples = os_random_normal(200_001)
    assert samples.shape == (200_001,) and samples.dtype == torch.float64
    assert abs(float(samples.mean())) < 0.01
    assert float(samples.std()) == pytest.approx(1.0, abs=0.01)
    assert float((samples.abs() < 1).double().mean()) == pytest.approx(0.6827, abs=0.005)
    assert float((samples**4).mean()) == pytest.approx(3.0, abs=0.06)  # Gaussian kurtosis
