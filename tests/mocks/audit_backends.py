"""Bigram backends for the privacy audit's tests: one that adds no noise, one without gradient canaries.

``NoiselessBigram`` declares ``dp_sgd`` and clips, but adds no noise, while the
engine's accountant charges every step as if it did: the broken implementation
an audit must catch. ``CanarylessBigram`` is honest but cannot take a white-box
audit. Both are registered by ``AuditBigrams``.
"""

from __future__ import annotations

from tensafe import capabilities, hookimpl
from tensafe.config import DPConfig
from tensafe.hookspecs import Register
from tensafe_bigram.backend import BigramBackend


class NoiselessBigram(BigramBackend):
    """Clips each datum but adds no noise."""

    def _noise_std(self, dp: DPConfig) -> float:
        return 0.0


class CanarylessBigram(BigramBackend):
    """Honest DP-SGD without the ``gradient_canaries`` capability."""

    capabilities = BigramBackend.capabilities - {capabilities.GRADIENT_CANARIES}


class AuditBigrams:
    @hookimpl
    def tensafe_register_ml_backends(self, register: Register) -> None:
        register("bigram-noiseless", NoiselessBigram)
        register("bigram-canaryless", CanarylessBigram)
