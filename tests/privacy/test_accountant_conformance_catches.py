"""The conformance suite's reference checks fail accountants that under-state the privacy loss.

Each variant (tests/mocks/nonprivate_accountants.py) must fail the checks
aimed at its flaw; the honest rdp and pld accountants pass the whole suite
(test_conformance.py).
"""

from __future__ import annotations

import re

import pytest

from tensafe.interfaces import PrivacyAccountant
from tensafe.testing import PrivacyAccountantConformance, fresh_plugin_manager
from tensafe.testing.accountant import (
    CALIBRATION_POINT_IDS,
    CALIBRATION_POINTS,
    REFERENCE_POINT_IDS,
    REFERENCE_POINTS,
)
from tests.mocks.nonprivate_accountants import NonPrivateAccountants


class NonPrivateAccountantSuite(PrivacyAccountantConformance):
    """The conformance suite over a variant registered by the test rather than by an entry point."""

    def make_accountant(self) -> PrivacyAccountant:
        registry = fresh_plugin_manager(plugins=[NonPrivateAccountants()]).registry
        accountant: PrivacyAccountant = registry.accountant(self.accountant_name)
        return accountant


def suite(name: str) -> NonPrivateAccountantSuite:
    return type(f"Suite_{name}", (NonPrivateAccountantSuite,), {"accountant_name": name})()


@pytest.mark.parametrize(("groups", "delta"), REFERENCE_POINTS, ids=REFERENCE_POINT_IDS)
def test_a_tenth_of_epsilon_is_below_the_reference(groups: tuple[tuple[float, float, int], ...], delta: float) -> None:
    checks = suite("rdp-tenth-epsilon")
    with pytest.raises(AssertionError, match=re.escape("the accountant under-states the privacy loss")):
        checks.test_epsilon_is_never_below_the_reference_lower_bound(checks.make_accountant(), groups, delta)
    with pytest.raises(AssertionError, match=re.escape("a lower bound on the true delta")):
        checks.test_delta_is_never_below_the_reference_lower_bound(checks.make_accountant(), groups, delta)


@pytest.mark.parametrize("name", ["rdp-tenth-epsilon", "rdp-under-calibrating"])
@pytest.mark.parametrize(("target", "delta", "q", "steps"), CALIBRATION_POINTS, ids=CALIBRATION_POINT_IDS)
def test_too_little_calibrated_noise_misses_the_target(
    name: str, target: float, delta: float, q: float, steps: int
) -> None:
    checks = suite(name)
    with pytest.raises(AssertionError, match=re.escape("calibrates too little noise")):
        checks.test_calibrated_noise_meets_the_target(checks.make_accountant(), target, delta, q, steps)


def test_a_tenth_of_epsilon_passes_the_checks_that_compare_the_accountant_with_itself() -> None:
    # Why the reference checks exist: without them, this accountant passes.
    checks = suite("rdp-tenth-epsilon")
    checks.test_epsilon_grows_with_steps(checks.make_accountant())
    checks.test_more_noise_spends_less()
    checks.test_delta_for_epsilon_is_consistent(checks.make_accountant())
