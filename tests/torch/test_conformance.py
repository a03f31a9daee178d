"""The torch backend passes the core conformance suite on the embedded tiny model."""

from __future__ import annotations

from typing import Any

from tensafe.config import RunConfig
from tensafe.testing import MLBackendConformance
from tensafe.types import AdamParams
from tests.torch.conftest import torch_config


class TestTorchConformance(MLBackendConformance):
    backend_name = "torch"

    def run_config(self, **dp: Any) -> RunConfig:
        return torch_config(**dp)

    def adam_params(self) -> AdamParams:
        return AdamParams(learning_rate=0.02)
