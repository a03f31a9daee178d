"""Where DP-SGD's Gaussian noise comes from, and why no saved state can regenerate it.

Every optimizer step draws its noise from a source keyed for that step alone:
no generator state lives from one step to the next, none is saved with a
training state, none is released. The source follows the config:

* ``dp.secure_rng`` (the default): a torch generator whose whole state comes
  from the operating system's CSPRNG, afresh for every step, so also for every
  start and resume. On CPU torch's generator is MT19937, and ``manual_seed``
  fills its 624-word state from the low 32 bits of the seed alone (a search of
  2**32 seeds would find it), so the words are written from the CSPRNG
  directly. On CUDA the generator is Philox, keyed by the full 64-bit seed.
* ``dp.secure_rng`` with ``dp.secure_mode``: Opacus' secure draw (each value is
  the sum of four Gaussian samples, halved, which resists floating-point
  attacks on the noise) with every sample taken from the OS CSPRNG itself, as
  Opacus' ``PrivacyEngine(secure_mode=True)`` does through torchcsprng, which
  has no build for torch 2. MT19937 and Philox are fast but not cryptographic:
  whoever recovers their state from some of a step's noise can predict the rest
  of that step's.
* without ``dp.secure_rng``: a torch generator seeded from a hash of
  (``training.seed``, step). A resumed run draws exactly what the uninterrupted
  run would have drawn: reproducible, and therefore not private, since whoever
  knows the seed can regenerate every draw. ``dp.secure_mode`` then applies
  Opacus' secure draw to that generator.
"""

from __future__ import annotations

import hashlib
import math
import os
import secrets
import struct
from collections.abc import Sequence
from functools import cache
from typing import Any

import torch
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

from tensafe.errors import BackendError

# torch's CPU generator state (CPUGeneratorImplState): seed (u64), left and seeded (i32 each), next (u64),
# then MT19937's 624 state words, each stored as a u64; the normal-sample caches follow.
MT_WORDS = 624
MT_OFFSET = 24
MT_STATE = struct.Struct(f"<{MT_WORDS}Q")
SEED_FIELD = struct.Struct("<Q")
UNIFORM_BITS = 53


def mt19937_init(seed: int) -> tuple[int, ...]:
    """MT19937's state words after seeding with the low 32 bits of ``seed`` (the reference ``init_genrand``)."""
    words = [seed & 0xFFFFFFFF]
    for index in range(1, MT_WORDS):
        previous = words[-1]
        words.append((1812433253 * (previous ^ (previous >> 30)) + index) & 0xFFFFFFFF)
    return tuple(words)


@cache
def _cpu_state_template() -> bytes:
    """A freshly seeded CPU generator state, once its layout is confirmed to be the one written to."""
    seed = 0x5EED_0000_1234  # any seed: MT19937 takes its low 32 bits
    state = bytes(torch.Generator().manual_seed(seed).get_state().tolist())
    if len(state) < MT_OFFSET + MT_STATE.size or MT_STATE.unpack_from(state, MT_OFFSET) != mt19937_init(seed):
        raise BackendError(
            f"torch {torch.__version__} lays out its CPU generator state differently from what tensafe-torch "
            "knows, so the DP noise generator cannot be seeded with more than 32 bits from the CSPRNG; "
            "set dp.secure_mode: true (noise drawn from the OS CSPRNG directly) or use a supported torch"
        )
    return state


def csprng_generator(device: torch.device) -> torch.Generator:
    """A torch generator on ``device`` whose whole state comes from the OS CSPRNG."""
    generator = torch.Generator(device=device)
    if device.type != "cpu":
        generator.manual_seed(secrets.randbits(64))  # Philox: the 64-bit seed is the whole key
        return generator
    state = bytearray(_cpu_state_template())  # left = 1: the first draw mixes all 624 words
    SEED_FIELD.pack_into(state, 0, secrets.randbits(64))
    MT_STATE.pack_into(state, MT_OFFSET, *struct.unpack(f"<{MT_WORDS}I", secrets.token_bytes(4 * MT_WORDS)))
    generator.set_state(torch.frombuffer(state, dtype=torch.uint8))
    return generator


def research_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The generator of step ``step`` of a run seeded with ``seed``: reproducible, not private."""
    digest = hashlib.sha256(f"tensafe-torch dp noise|{seed}|{step}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little"))


def os_random_normal(count: int) -> torch.Tensor:
    """``count`` standard normal float64 samples on CPU from the OS CSPRNG (Box-Muller on 53-bit uniforms)."""
    if count == 0:
        return torch.zeros(0, dtype=torch.float64)
    pairs = (count + 1) // 2
    words = torch.frombuffer(bytearray(os.urandom(16 * pairs)), dtype=torch.int64)
    uniform = ((words >> (64 - UNIFORM_BITS)) & ((1 << UNIFORM_BITS) - 1)).to(torch.float64) * 2.0**-UNIFORM_BITS
    radius = torch.sqrt(-2.0 * torch.log1p(-uniform[:pairs]))  # log(1 - u), u in [0, 1): finite
    angle = (2 * math.pi) * uniform[pairs:]
    return torch.cat((radius * torch.cos(angle), radius * torch.sin(angle)))[:count]


def secure_os_random_normal(count: int) -> torch.Tensor:
    """Opacus' secure draw from the OS CSPRNG: each value is the sum of four standard normals, halved."""
    return os_random_normal(4 * count).view(4, count).sum(dim=0) / 2


class StepKeyedDPOptimizer(DPOptimizer):
    """Opacus' DPOptimizer whose noise source is keyed afresh for each step (see the module docstring).

    ``research_seed`` None draws from the OS CSPRNG; an integer makes the noise
    of each step a function of (seed, step). Noise is added by
    :meth:`add_step_noise`; the inherited ``add_noise`` is refused so that no
    path draws from a generator that was not keyed for the step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, research_seed: int | None, **kwargs: Any) -> None:
        super().__init__(optimizer, generator=None, **kwargs)
        self.generator: torch.Generator | None = None  # set for the length of one step's draw
        self._research_seed = research_seed
        if research_seed is None and not self.secure_mode:
            csprng_generator(self.params[0].device)  # fail at initialisation, not mid-run, if it cannot be keyed

    def accumulate_clipped(self, sums: Sequence[torch.Tensor]) -> None:
        """Add a micro-batch's clipped per-sample gradients, summed elsewhere, to the running sums.

        What ``clip_and_accumulate`` does after clipping ``p.grad_sample``, for
        per-sample gradients that never became a ``grad_sample`` (``dp.clipping: lora``).
        """
        for param, summed in zip(self.params, sums, strict=True):
            if summed.shape != param.shape:
                raise BackendError(
                    f"a clipped sum of shape {tuple(summed.shape)} for a parameter of {tuple(param.shape)}"
                )
            param.summed_grad = summed if param.summed_grad is None else param.summed_grad + summed

    def add_noise(self) -> None:
        raise BackendError("the torch backend adds DP noise through add_step_noise(step), keyed for that step")

    def add_step_noise(self, step: int) -> None:
        """Add the noise of the step that follows ``step`` completed steps to the clipped sums, into ``p.grad``."""
        if self._research_seed is None and self.secure_mode:
            self._add_os_random_noise()
            return
        device = self.params[0].device
        if self._research_seed is None:
            self.generator = csprng_generator(device)
        else:
            self.generator = research_generator(self._research_seed, step, device)
        try:
            super().add_noise()
        finally:
            self.generator = None  # the step's generator does not outlive the step

    def _add_os_random_noise(self) -> None:
        sums = [p.summed_grad for p in self.params]
        for summed in sums:
            _check_processed_flag(summed)
        std = self.noise_multiplier * self.max_grad_norm
        noise = secure_os_random_normal(sum(s.numel() for s in sums)) * std
        for param, summed, part in zip(self.params, sums, noise.split([s.numel() for s in sums]), strict=True):
            param.grad = (summed + part.view_as(summed).to(summed.device, summed.dtype)).view_as(param)
            _mark_as_processed(summed)
