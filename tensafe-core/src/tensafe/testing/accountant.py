"""Conformance tests for :class:`tensafe.interfaces.PrivacyAccountant`."""

from __future__ import annotations

import json
from typing import ClassVar

import pytest

from tensafe.interfaces import PrivacyAccountant
from tensafe.testing.support import fresh_plugin_manager, skip_unless_capable

DELTA = 1e-5


class PrivacyAccountantConformance:
    """Subclass with ``accountant_name = "..."`` to test a registered accountant."""

    accountant_name: ClassVar[str]

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

    def test_calibrated_noise_meets_the_target(self, accountant: PrivacyAccountant) -> None:
        sigma = accountant.calibrate_noise_multiplier(3.0, DELTA, 0.01, 1000)
        check = self.make_accountant()
        check.compose_step(0.01, sigma, count=1000)
        epsilon = check.get_epsilon(DELTA)
        assert epsilon <= 3.0
        assert epsilon > 2.8, "calibration should not waste most of the budget"
