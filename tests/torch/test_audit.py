"""Gradient canaries and the white-box audit in the torch backend."""

from __future__ import annotations

import pytest
import torch

from tensafe.errors import BackendError
from tensafe.interfaces import MLBackend
from tensafe.testing import fresh_plugin_manager
from tensafe.types import AdamParams
from tests.mocks.torch_audit_backends import NoiselessTorchPlugin
from tests.torch import test_conformance
from tests.torch.conftest import make_backend


def test_a_canary_is_clipped_like_a_datum_and_lands_on_its_coordinate() -> None:
    clip, batch = 0.5, 4  # batch: torch_config's training.batch_size
    backend = make_backend(noise_multiplier=1e-9, max_grad_norm=clip)
    parameters = sum(p.numel() for p in backend._params)
    big, small, last = 7, parameters // 2, parameters - 1
    backend.forward_backward_canaries([big, big], 10 * clip)  # two canaries: each clipped to C
    backend.forward_backward_canaries([small], 0.2 * clip)  # below C: kept as it is
    backend.forward_backward_canaries([last], 10 * clip)
    backend.optim_step(AdamParams(learning_rate=1e-3))
    gradient = torch.tensor(backend.noised_gradient())
    assert float(gradient[big]) == pytest.approx(2 * clip / batch, rel=1e-4)
    assert float(gradient[small]) == pytest.approx(0.2 * clip / batch, rel=1e-4)
    assert float(gradient[last]) == pytest.approx(clip / batch, rel=1e-4)
    gradient[[big, small, last]] = 0.0
    assert float(gradient.abs().max()) < 1e-6, "nothing lands elsewhere"


def test_canaries_need_dp_and_coordinates_inside_the_parameters() -> None:
    with pytest.raises(BackendError, match="need DP-SGD"):
        make_backend().forward_backward_canaries([0], 1.0)
    backend = make_backend(noise_multiplier=1.0)
    with pytest.raises(BackendError, match="outside"):
        backend.forward_backward_canaries([10**9], 1.0)
    with pytest.raises(BackendError, match="positive finite"):
        backend.forward_backward_canaries([0], float("nan"))


class _NoiselessSuite(test_conformance.TestTorchConformance):
    backend_name = "torch-noiseless"

    def new_backend(self) -> MLBackend:
        backend: MLBackend = fresh_plugin_manager(plugins=[NoiselessTorchPlugin()]).registry.ml_backend(
            self.backend_name
        )
        return backend


def test_the_white_box_audit_fails_torch_without_noise() -> None:
    suite = _NoiselessSuite()
    with pytest.raises(AssertionError, match="verdict: VIOLATION: lower bound exceeds the claimed epsilon"):
        suite.test_dp_white_box_audit_finds_no_violation(suite.make_backend())
