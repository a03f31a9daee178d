"""Bigram backends that declare ``dp_sgd`` but break DP-SGD, each in one way, for the suite's DP checks to catch.

Registered by ``NonPrivateBigrams`` under the names in ``VARIANTS``; the tests
in tests/core/test_dp_conformance.py run the conformance checks against each.
"""

from __future__ import annotations

import json
import math
import random
from array import array

from tensafe import capabilities, hookimpl
from tensafe.config import DPConfig, RunConfig
from tensafe.hookspecs import Register
from tensafe.types import ModelInfo
from tensafe_bigram.backend import BigramBackend


class UnclippedBigram(BigramBackend):
    """Sums the data's gradients without clipping them."""

    def _clipped_sum(self, clip: float) -> array[float]:
        return self._summed_gradient()


class BatchClippedBigram(BigramBackend):
    """Clips the summed gradient of all data instead of each datum's."""

    def _clipped_sum(self, clip: float) -> array[float]:
        total = self._summed_gradient()
        norm = math.sqrt(math.fsum(g * g for g in total))
        scale = min(1.0, clip / norm) if norm > 0.0 else 1.0
        return array("d", [g * scale for g in total])


class FaintNoiseBigram(BigramBackend):
    """Adds a billionth of the noise DP-SGD requires."""

    def _noise_std(self, dp: DPConfig) -> float:
        return 1e-9 * super()._noise_std(dp)


class UnderNoisedBigram(BigramBackend):
    """Adds 80 % of the noise's standard deviation."""

    def _noise_std(self, dp: DPConfig) -> float:
        return 0.8 * super()._noise_std(dp)


class _UniformSource(random.SystemRandom):
    def gauss(self, mu: float = 0.0, sigma: float = 1.0) -> float:
        return mu + sigma * math.sqrt(3.0) * (2.0 * self.random() - 1.0)


class UniformNoiseBigram(BigramBackend):
    """Adds noise of the right standard deviation, but uniform rather than Gaussian."""

    def _noise_source(self, config: RunConfig) -> random.Random:
        return _UniformSource()


class ConstantSeedBigram(BigramBackend):
    """Seeds the noise from a constant, even under ``secure_rng``: every fresh backend draws the same noise."""

    def initialize_model(self, config: RunConfig) -> ModelInfo:
        self._constant = random.Random(0)
        return super().initialize_model(config)

    def _noise_source(self, config: RunConfig) -> random.Random:
        return self._constant


class PersistedNoiseBigram(BigramBackend):
    """Seeds the noise from the OS, but saves the generator's state and restores it on load."""

    def initialize_model(self, config: RunConfig) -> ModelInfo:
        self._persisted = random.Random()
        return super().initialize_model(config)

    def _noise_source(self, config: RunConfig) -> random.Random:
        return self._persisted

    def save_state(self) -> bytes:
        state = json.loads(super().save_state())
        version, internal, gauss_next = self._persisted.getstate()
        state["noise_rng"] = [version, list(internal), gauss_next]
        return json.dumps(state).encode()

    def load_state(self, state: bytes) -> int:
        step = super().load_state(state)
        version, internal, gauss_next = json.loads(state)["noise_rng"]
        self._persisted.setstate((version, tuple(internal), gauss_next))
        return step


class UnprobedBigram(BigramBackend):
    """Declares ``dp_sgd`` without ``dp_probe``: its DP-SGD cannot be checked."""

    capabilities = BigramBackend.capabilities - {capabilities.DP_PROBE}


VARIANTS: dict[str, type[BigramBackend]] = {
    "bigram-unclipped": UnclippedBigram,
    "bigram-batch-clipped": BatchClippedBigram,
    "bigram-faint-noise": FaintNoiseBigram,
    "bigram-under-noised": UnderNoisedBigram,
    "bigram-uniform-noise": UniformNoiseBigram,
    "bigram-constant-seed": ConstantSeedBigram,
    "bigram-persisted-noise": PersistedNoiseBigram,
    "bigram-unprobed": UnprobedBigram,
}


class NonPrivateBigrams:
    """Registers every variant in ``VARIANTS`` as an ML backend."""

    @hookimpl
    def tensafe_register_ml_backends(self, register: Register) -> None:
        for name, cls in VARIANTS.items():
            register(name, cls)
