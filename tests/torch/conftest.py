"""Fixtures for the torch backend: the embedded tiny model, DP and non-DP."""

from __future__ import annotations

from typing import Any

import pytest

from tensafe.config import DPConfig, RunConfig
from tensafe.testing import fresh_plugin_manager
from tensafe_torch.backend import TorchBackend


def torch_config(**dp: Any) -> RunConfig:
    dp_config = DPConfig(**{"target_epsilon": None, "secure_rng": False, **dp}) if dp else DPConfig(enabled=False)
    return RunConfig(backend="torch", dp=dp_config, training={"batch_size": 4, "seed": 0}, lora={"rank": 4, "seed": 0})


def make_backend(**dp: Any) -> TorchBackend:
    backend = fresh_plugin_manager(autoload=True).registry.ml_backend("torch")
    assert isinstance(backend, TorchBackend)
    backend.initialize_model(torch_config(**dp))
    return backend


@pytest.fixture
def backend() -> TorchBackend:
    return make_backend()
