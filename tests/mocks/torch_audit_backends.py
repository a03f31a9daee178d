"""A torch backend that adds no DP noise while declaring dp_sgd, for the privacy audit's torch tests.

It imports tensafe_torch (and so torch): only the torch tests use it.
"""

from __future__ import annotations

from typing import Any

from tensafe import hookimpl
from tensafe.hookspecs import Register
from tensafe_torch.backend import TorchBackend


class NoiselessTorch(TorchBackend):
    """Clips each datum with Opacus but adds no noise."""

    def _attach(self, model: Any) -> None:
        super()._attach(model)
        if self._dp is not None:
            self._dp.noise_multiplier = 0.0


class NoiselessTorchPlugin:
    @hookimpl
    def tensafe_register_ml_backends(self, register: Register) -> None:
        register("torch-noiseless", NoiselessTorch)
