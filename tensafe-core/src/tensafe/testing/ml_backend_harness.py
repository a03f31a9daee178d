"""The settings and fixtures that the ML backend conformance mixins share; a plugin overrides the settings."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from tensafe.config import DPConfig, RunConfig
from tensafe.interfaces import MLBackend
from tensafe.testing.support import fresh_plugin_manager, skip_unless_capable
from tensafe.types import AdamParams, Datum, datum_from_sequence

TEXT = "the quick brown fox jumps over the lazy dog"


class MLBackendHarness:
    """Subclass with ``backend_name = "..."``; override the settings your backend needs."""

    backend_name: ClassVar[str]

    # -- overridable settings ---------------------------------------------------

    def run_config(self, **dp: Any) -> RunConfig:
        """The config backends are initialised with; ``dp`` fields enable DP-SGD."""
        dp_config = DPConfig(**dp) if dp else DPConfig(enabled=False)
        return RunConfig(backend=self.backend_name, dp=dp_config)

    def adam_params(self) -> AdamParams:
        """Optimizer settings under which a few steps visibly reduce the loss."""
        return AdamParams(learning_rate=0.05)

    def new_backend(self) -> MLBackend:
        """An uninitialised backend, looked up by name through a fresh plugin manager (registration is tested too)."""
        backend: MLBackend = fresh_plugin_manager(autoload=True).registry.ml_backend(self.backend_name)
        return backend

    # -- fixtures ---------------------------------------------------------------

    def make_backend(self, **dp: Any) -> MLBackend:
        backend = self.new_backend()
        backend.initialize_model(self.run_config(**dp))
        return backend

    @pytest.fixture
    def backend(self, request: pytest.FixtureRequest) -> MLBackend:
        backend = self.make_backend()
        skip_unless_capable(request, backend)
        return backend

    def datum(self, backend: MLBackend, text: str = TEXT, prompt: str = "") -> Datum:
        prompt_tokens = backend.encode(prompt) if prompt else []
        return datum_from_sequence(prompt_tokens + backend.encode(text), prompt_length=len(prompt_tokens))

    def step(self, backend: MLBackend, data: list[Datum]) -> float:
        loss = backend.forward_backward(data, "cross_entropy").metrics["loss:sum"]
        backend.optim_step(self.adam_params())
        return loss
