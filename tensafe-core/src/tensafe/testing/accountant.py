"""Conformance tests for :class:`tensafe.interfaces.PrivacyAccountant`.

Besides the interface, an accountant must never report less privacy loss than
a reference lower bound computed with Google's dp-accounting for the same
steps, and the noise it calibrates must meet the target under that bound too
(see :mod:`tensafe.testing.reference_accounting` and docs/plugins.md,
"Proving DP-SGD").
"""

from __future__ import annotations

import json
from typing import ClassVar

import pytest

from tensafe.interfaces import PrivacyAccountant
from tensafe.testing.reference_accounting import Group, delta_lower_bound, epsilon_lower_bound
from tensafe.testing.support import fresh_plugin_manager, skip_unless_capable

DELTA = 1e-5

#: Runs of DP-SGD steps and the delta at which the reference bound is checked.
REFERENCE_POINTS: list[tuple[tuple[Group, ...], float]] = [
    (((0.01, 1.0, 1000),), 1e-5),
    (((1.0, 5.0, 10),), 1e-5),  # q = 1: full batches, no amplification by sampling
    (((1.0, 1.0, 1),), 1e-5),  # a single Gaussian mechanism
    (((0.05, 0.8, 200),), 1e-6),
    (((0.02, 1.1, 50), (0.05, 0.9, 20)), 1e-5),  # the rate and noise change mid-run
]
#: (target epsilon, delta, q, steps) at which noise calibration is checked.
CALIBRATION_POINTS: list[tuple[float, float, float, int]] = [
    (3.0, 1e-5, 0.01, 1000),
    (2.0, 1e-5, 1.0, 10),
]


def _point_id(groups: tuple[Group, ...], delta: float) -> str:
    steps = "+".join(f"q={q:g},sigma={sigma:g},steps={count}" for q, sigma, count in groups)
    return f"{steps},delta={delta:g}"


REFERENCE_POINT_IDS = [_point_id(groups, delta) for groups, delta in REFERENCE_POINTS]
CALIBRATION_POINT_IDS = [f"epsilon={e:g},delta={d:g},q={q:g},steps={n}" for e, d, q, n in CALIBRATION_POINTS]


class PrivacyAccountantConformance:
    """Subclass with ``accountant_name = "..."`` to test a registered accountant."""

    accountant_name: ClassVar[str]
    #: Relative slack below the reference lower bound, for floating-point rounding only: the bound is a
    #: proven lower bound, and an honest accountant's epsilon is at or above the true one.
    reference_rtol: ClassVar[float] = 1e-3
    #: An accountant's epsilon at the noise it calibrated must reach this share of the target.
    calibration_use: ClassVar[float] = 0.93

    def make_accountant(self) -> PrivacyAccountant:
        accountant: PrivacyAccountant = fresh_plugin_manager(autoload=True).registry.accountant(self.accountant_name)
        return accountant

    @pytest.fixture
    def accountant(self, request: pytest.FixtureRequest) -> PrivacyAccountant:
        accountant = self.make_accountant()
        skip_unless_capable(request, accountant)
        return accountant

    def test_is_a_privacy_accountant(self, accountant: PrivacyAccountant) -> None:
        assert isinstance(accountant, PrivacyAccountant)

    def test_nothing_spent_before_any_step(self, accountant: PrivacyAccountant) -> None:
        assert accountant.steps == 0
        assert accountant.get_epsilon(DELTA) == pytest.approx(0.0, abs=1e-6)

    def test_epsilon_grows_with_steps(self, accountant: PrivacyAccountant) -> None:
        epsilons = []
        for _ in range(3):
            accountant.compose_step(0.01, 1.0, count=100)
            epsilons.append(accountant.get_epsilon(DELTA))
        assert accountant.steps == 300
        assert 0 < epsilons[0] < epsilons[1] < epsilons[2]

    def test_more_noise_spends_less(self) -> None:
        low, high = self.make_accountant(), self.make_accountant()
        low.compose_step(0.02, 0.8, count=200)
        high.compose_step(0.02, 1.6, count=200)
        assert high.get_epsilon(DELTA) < low.get_epsilon(DELTA)

    def test_delta_for_epsilon_is_consistent(self, accountant: PrivacyAccountant) -> None:
        accountant.compose_step(0.02, 1.1, count=500)
        epsilon = accountant.get_epsilon(DELTA)
        assert accountant.get_delta(epsilon) <= DELTA * 1.05
        assert accountant.get_delta(epsilon * 0.5) > DELTA

    def test_state_round_trips_through_json(self, accountant: PrivacyAccountant) -> None:
        accountant.compose_step(0.02, 1.1, count=50)
        accountant.compose_step(0.05, 0.9, count=20)
        state = json.loads(json.dumps(accountant.state()))
        restored = self.make_accountant()
        restored.load_state(state)
        assert restored.steps == accountant.steps
        assert restored.get_epsilon(DELTA) == accountant.get_epsilon(DELTA)
        restored.compose_step(0.02, 1.1)
        accountant.compose_step(0.02, 1.1)
        assert restored.get_epsilon(DELTA) == accountant.get_epsilon(DELTA)

    @pytest.mark.parametrize(("groups", "delta"), REFERENCE_POINTS, ids=REFERENCE_POINT_IDS)
    def test_epsilon_is_never_below_the_reference_lower_bound(
        self, accountant: PrivacyAccountant, groups: tuple[Group, ...], delta: float
    ) -> None:
        for q, sigma, count in groups:
            accountant.compose_step(q, sigma, count=count)
        bound = epsilon_lower_bound(groups, delta)
        epsilon = accountant.get_epsilon(delta)
        assert epsilon >= bound * (1 - self.reference_rtol), (
            f"epsilon {epsilon:.6g} at delta={delta:g} is below {bound:.6g}, a lower bound on the true epsilon of "
            f"these DP-SGD steps (dp-accounting's privacy loss distribution rounded down; slack "
            f"{self.reference_rtol:g}): the accountant under-states the privacy loss"
        )

    @pytest.mark.parametrize(("groups", "delta"), REFERENCE_POINTS, ids=REFERENCE_POINT_IDS)
    def test_delta_is_never_below_the_reference_lower_bound(
        self, accountant: PrivacyAccountant, groups: tuple[Group, ...], delta: float
    ) -> None:
        for q, sigma, count in groups:
            accountant.compose_step(q, sigma, count=count)
        epsilon = epsilon_lower_bound(groups, delta)
        bound = delta_lower_bound(groups, epsilon)
        reported = accountant.get_delta(epsilon)
        assert reported >= bound * (1 - self.reference_rtol), (
            f"delta {reported:.6g} at epsilon={epsilon:.6g} is below {bound:.6g}, a lower bound on the true delta "
            f"of these DP-SGD steps (slack {self.reference_rtol:g}): the accountant under-states the privacy loss"
        )

    @pytest.mark.parametrize(("target", "delta", "q", "steps"), CALIBRATION_POINTS, ids=CALIBRATION_POINT_IDS)
    def test_calibrated_noise_meets_the_target(
        self, accountant: PrivacyAccountant, target: float, delta: float, q: float, steps: int
    ) -> None:
        sigma = accountant.calibrate_noise_multiplier(target, delta, q, steps)
        floor = epsilon_lower_bound([(q, sigma, steps)], delta)
        assert floor <= target * (1 + self.reference_rtol), (
            f"the calibrated noise multiplier {sigma:.6g} for epsilon={target:g} at delta={delta:g}, q={q:g}, "
            f"{steps} steps spends at least {floor:.6g} (dp-accounting's lower bound): the accountant calibrates "
            "too little noise for its target"
        )
        check = self.make_accountant()
        check.compose_step(q, sigma, count=steps)
        epsilon = check.get_epsilon(delta)
        assert epsilon <= target, (
            f"the accountant's own epsilon {epsilon:.6g} at its calibrated noise exceeds {target:g}"
        )
        assert epsilon > self.calibration_use * target, "calibration should not waste most of the budget"
