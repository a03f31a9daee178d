"""The torch backend passes the DP-SGD conformance checks with dp.secure_mode on (noise from the OS CSPRNG)."""

from __future__ import annotations

from typing import Any

from tensafe.config import RunConfig
from tensafe.testing import DPSGDConformance
from tensafe.types import AdamParams
from tests.torch.conftest import torch_config


class TestTorchSecureModeDPConformance(DPSGDConformance):
    backend_name = "torch"

    def run_config(self, **dp: Any) -> RunConfig:
        return torch_config(**dp, secure_mode=True) if dp else torch_config()

    def adam_params(self) -> AdamParams:
        return AdamParams(learning_rate=0.02)
