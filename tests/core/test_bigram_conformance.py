"""The third-party-style plugin under tests/plugins passes the conformance suite."""

from __future__ import annotations

import pytest

from tensafe.interfaces import MLBackend
from tensafe.testing import MLBackendConformance

# The bigram backend's gradients follow docs/plugins.md, but the loss values it reports do not: it clips the
# ratio in importance_sampling, and computes PPO's objective as A * min(r, clip(r)), which is wrong for negative
# advantages. Strict: these fail loudly (XPASS) once the backend is fixed, so the marks get removed.
REPORTED_POLICY_LOSS = pytest.mark.xfail(
    strict=True, reason="bigram reports importance_sampling / ppo loss values that are not the documented formulas"
)


class TestBigramConformance(MLBackendConformance):
    backend_name = "bigram"

    @REPORTED_POLICY_LOSS
    def test_importance_sampling_loss_is_minus_ratio_times_advantage(self, backend: MLBackend) -> None:
        super().test_importance_sampling_loss_is_minus_ratio_times_advantage(backend)

    @REPORTED_POLICY_LOSS
    @pytest.mark.parametrize("clip", [None, (0.95, 1.05)])
    def test_ppo_loss_is_the_clipped_objective(self, backend: MLBackend, clip: tuple[float, float] | None) -> None:
        super().test_ppo_loss_is_the_clipped_objective(backend, clip)
