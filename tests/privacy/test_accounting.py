"""Epsilon must equal what Google's dp-accounting computes, and never under-state it."""

from __future__ import annotations

import pytest
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from hypothesis import given, settings
from hypothesis import strategies as st

from tensafe.errors import UsageError
from tensafe_privacy.accountants import PldAccountant, RdpAccountant

DELTA = 1e-5

# (q, sigma, steps, RDP epsilon, PLD epsilon) at delta = 1e-5; the first row's RDP value is also
# Opacus' own test value 7.32911 and its PLD value is within 1e-2 of Opacus' PRV result 6.7774.
TABLE = [(0.04, 1.5, 2250, 7.3293, 6.7688), (0.01, 1.1, 10000, 5.6320, 5.1926)]


def direct(accountant: object, q: float, sigma: float, steps: int) -> float:
    accountant.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)  # type: ignore[attr-defined]
    return float(accountant.get_epsilon(DELTA))  # type: ignore[attr-defined]


@pytest.mark.parametrize(("q", "sigma", "steps", "rdp", "pld"), TABLE)
def test_rdp_matches_the_reference_table_and_dp_accounting(
    q: float, sigma: float, steps: int, rdp: float, pld: float
) -> None:
    accountant = RdpAccountant()
    accountant.compose_step(q, sigma, steps)
    epsilon = accountant.get_epsilon(DELTA)
    assert epsilon == pytest.approx(rdp, rel=1e-4)
    assert epsilon == direct(rdp_privacy_accountant.RdpAccountant(), q, sigma, steps)


@pytest.mark.parametrize(("q", "sigma", "steps", "rdp", "pld"), TABLE)
def test_pld_matches_the_reference_table_and_dp_accounting(
    q: float, sigma: float, steps: int, rdp: float, pld: float
) -> None:
    accountant = PldAccountant()
    accountant.compose_step(q, sigma, steps)
    epsilon = accountant.get_epsilon(DELTA)
    assert epsilon == pytest.approx(pld, abs=1e-2)
    assert epsilon == pytest.approx(direct(pld_privacy_accountant.PLDAccountant(), q, sigma, steps), abs=1e-9)
    assert epsilon < rdp, "the tight accountant is tighter than RDP"


def test_step_by_step_equals_composed_at_once() -> None:
    stepwise, at_once = RdpAccountant(), RdpAccountant()
    for _ in range(300):
        stepwise.compose_step(0.02, 1.2)
    at_once.compose_step(0.02, 1.2, 300)
    assert stepwise.state() == at_once.state()
    assert stepwise.get_epsilon(DELTA) == at_once.get_epsilon(DELTA)


def test_changing_q_and_sigma_composes_like_dp_accounting() -> None:
    ours = RdpAccountant()
    theirs = rdp_privacy_accountant.RdpAccountant()
    for q, sigma, n in [(0.01, 1.0, 100), (0.05, 2.0, 50), (0.01, 1.0, 25)]:
        ours.compose_step(q, sigma, n)
        theirs.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), n)
    assert len(ours.groups) == 3
    assert ours.get_epsilon(DELTA) == theirs.get_epsilon(DELTA)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda a: a.compose_step(1.5, 1.0), "sampling_rate must be in"),
        (lambda a: a.compose_step(0.0, 1.0), "sampling_rate must be in"),
        (lambda a: a.compose_step(0.1, 0.0), "noise_multiplier must be"),
        (lambda a: a.compose_step(0.1, float("nan")), "noise_multiplier must be"),
        (lambda a: a.compose_step(0.1, 1.0, -3), "steps must be"),
        (lambda a: a.get_epsilon(1.0), "delta must be in"),
        (lambda a: a.get_epsilon(float("nan")), "delta must be in"),
        (lambda a: a.get_delta(-1.0), "epsilon must be"),
        (lambda a: a.load_state({"version": 99}), "not a version-1"),
        (lambda a: a.load_state({"version": 1, "neighbouring_relation": "replace_one", "groups": []}), "relation"),
    ],
)
def test_bad_parameters_are_named(call: object, message: str) -> None:
    for accountant in (RdpAccountant(), PldAccountant()):
        with pytest.raises(UsageError, match=message):
            call(accountant)  # type: ignore[operator]


def test_calibration_errs_on_the_private_side() -> None:
    accountant = RdpAccountant()
    sigma = accountant.calibrate_noise_multiplier(2.0, DELTA, 0.02, 500)
    assert accountant.epsilon_with(0.02, sigma, 500, DELTA) <= 2.0
    assert accountant.epsilon_with(0.02, sigma - 1e-3, 500, DELTA) > 2.0, "sigma is (nearly) the smallest that works"


def test_calibration_accounts_for_what_is_already_spent() -> None:
    fresh, used = RdpAccountant(), RdpAccountant()
    used.compose_step(0.02, 1.0, 200)
    assert used.calibrate_noise_multiplier(3.0, DELTA, 0.02, 200) > fresh.calibrate_noise_multiplier(
        3.0, DELTA, 0.02, 200
    )
    used.compose_step(0.02, 0.3, 2000)
    with pytest.raises(UsageError, match="already spent"):
        used.calibrate_noise_multiplier(3.0, DELTA, 0.02, 200)


def test_max_steps_is_exact() -> None:
    accountant = RdpAccountant()
    steps = accountant.max_steps(1.0, 0.01, DELTA, 4.0)
    assert (
        accountant.epsilon_with(0.01, 1.0, steps, DELTA) <= 4.0 < accountant.epsilon_with(0.01, 1.0, steps + 1, DELTA)
    )


SETTINGS = settings(max_examples=20, deadline=None)
qs = st.floats(1e-3, 0.2)
sigmas = st.floats(0.6, 4.0)


@SETTINGS
@given(q=qs, sigma=sigmas, steps=st.integers(1, 3000), more=st.integers(1, 3000))
def test_epsilon_never_decreases_with_steps(q: float, sigma: float, steps: int, more: int) -> None:
    accountant = RdpAccountant()
    assert accountant.epsilon_with(q, sigma, steps, DELTA) <= accountant.epsilon_with(q, sigma, steps + more, DELTA)


@SETTINGS
@given(q=qs, sigma=sigmas, extra=st.floats(0.01, 2.0), steps=st.integers(1, 3000))
def test_epsilon_never_increases_with_noise(q: float, sigma: float, extra: float, steps: int) -> None:
    accountant = RdpAccountant()
    assert accountant.epsilon_with(q, sigma + extra, steps, DELTA) <= accountant.epsilon_with(q, sigma, steps, DELTA)


@settings(max_examples=6, deadline=None)
@given(q=st.floats(5e-3, 0.1), sigma=st.floats(0.8, 2.0), steps=st.integers(10, 2000))
def test_rdp_is_never_below_pld(q: float, sigma: float, steps: int) -> None:
    rdp = RdpAccountant().epsilon_with(q, sigma, steps, DELTA)
    pld = PldAccountant().epsilon_with(q, sigma, steps, DELTA)
    assert rdp >= pld - 1e-2


@settings(max_examples=10, deadline=None)
@given(target=st.floats(0.5, 10.0), q=st.floats(1e-3, 0.1), steps=st.integers(10, 5000))
def test_calibrate_then_epsilon_lands_at_or_just_under_the_target(target: float, q: float, steps: int) -> None:
    accountant = RdpAccountant()
    sigma = accountant.calibrate_noise_multiplier(target, DELTA, q, steps)
    epsilon = accountant.epsilon_with(q, sigma, steps, DELTA)
    assert epsilon <= target
    assert epsilon >= 0.97 * target
