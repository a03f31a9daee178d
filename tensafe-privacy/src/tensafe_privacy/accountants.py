"""DP-SGD privacy accountants over Google's dp-accounting.

Each optimizer step of DP-SGD is the event
``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))``: every record joins the
batch independently with probability ``q``, and the clipped, summed gradient
gets Gaussian noise of standard deviation ``sigma * C``. Neighbouring datasets
differ by adding or removing one record (``ADD_OR_REMOVE_ONE``).

* :class:`RdpAccountant` composes those events with dp-accounting's
  ``RdpAccountant`` (Rényi DP at its default orders, converted to
  (epsilon, delta)). It is an upper bound that is loose by roughly 5-10 %.
* :class:`PldAccountant` composes them as privacy loss distributions exactly as
  dp-accounting's ``PLDAccountant`` does (``from_gaussian_mechanism(...,
  sampling_prob=q).self_compose(count)``, pessimistic estimate, connect-the-dots,
  value discretisation interval 1e-4). Discretisation only ever *over*-states
  epsilon, by at most about 1e-2 in the regimes DP-SGD uses: it is the tight
  accountant. The name ``prv`` is registered as an alias.

The state is the list of ``(q, sigma, count)`` groups composed so far, so it is
JSON, exact, and rebuilds an identical accountant. Results are cached per
state, which makes "epsilon after the next step" followed by "epsilon now" (as
the orchestrator asks) cost one computation.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
from dp_accounting import dp_event, mechanism_calibration
from dp_accounting.pld import pld_privacy_accountant, privacy_loss_distribution
from dp_accounting.rdp import rdp_privacy_accountant

from tensafe.errors import UsageError
from tensafe.interfaces import PrivacyAccountant

NEIGHBOURING_RELATION = "add_or_remove_one"
STATE_VERSION = 1
PLD_DISCRETIZATION = 1e-4
#: Tolerance of noise calibration, in sigma: the result is at most this far above the optimum
#: and always meets the target.
CALIBRATION_TOLERANCE = 1e-4

Group = tuple[float, float, int]


# -- parameter checks ------------------------------------------------------------


def check_sampling_rate(q: float) -> float:
    if not isinstance(q, int | float) or math.isnan(q) or not 0 < q <= 1:
        raise UsageError(f"sampling_rate must be in (0, 1], got {q}")
    return float(q)


def check_noise_multiplier(sigma: float) -> float:
    if not isinstance(sigma, int | float) or math.isnan(sigma) or not 0 < sigma < math.inf:
        raise UsageError(f"noise_multiplier must be a positive finite number, got {sigma}")
    return float(sigma)


def check_delta(delta: float) -> float:
    if not isinstance(delta, int | float) or math.isnan(delta) or not 0 < delta < 1:
        raise UsageError(f"delta must be in (0, 1), got {delta}")
    return float(delta)


def check_epsilon(epsilon: float) -> float:
    if not isinstance(epsilon, int | float) or math.isnan(epsilon) or not 0 < epsilon < math.inf:
        raise UsageError(f"epsilon must be a positive finite number, got {epsilon}")
    return float(epsilon)


def check_steps(steps: int, *, minimum: int = 0) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < minimum:
        raise UsageError(f"steps must be an integer >= {minimum}, got {steps}")
    return steps


def dpsgd_event(q: float, sigma: float) -> dp_event.DpEvent:
    """One DP-SGD step as a dp-accounting event."""
    return dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma))


def groups_event(groups: Sequence[Group]) -> dp_event.DpEvent:
    """All composed groups as one dp-accounting event."""
    return dp_event.ComposedDpEvent([dp_event.SelfComposedDpEvent(dpsgd_event(q, s), n) for q, s, n in groups])


# -- cached computations ------------------------------------------------------------


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """dp-accounting logs through absl when an RDP order fails to converge and is excluded; the
    remaining orders still give a valid bound, so the message is noise for TenSafe's users."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@functools.lru_cache(maxsize=64)
def _rdp_step(q: float, sigma: float) -> tuple[Any, Any]:
    """(orders, RDP of one step) exactly as dp-accounting's RdpAccountant computes them."""
    accountant = rdp_privacy_accountant.RdpAccountant()
    with _quiet_absl():
        accountant.compose(dpsgd_event(q, sigma), 1)
    # RdpAccountant adds count * (one step's RDP) per composed event; reading that one-step vector
    # lets any number of steps be accounted without recomputing it (same arithmetic, same result).
    return accountant._orders, accountant._rdp


@functools.lru_cache(maxsize=256)
def _rdp_total(groups: tuple[Group, ...]) -> tuple[Any, Any]:
    orders, first = _rdp_step(*groups[0][:2])
    total = np.zeros_like(first)
    for q, sigma, count in groups:
        total += count * _rdp_step(q, sigma)[1]
    return orders, total


@functools.lru_cache(maxsize=64)
def _pld_step(q: float, sigma: float) -> privacy_loss_distribution.PrivacyLossDistribution:
    return privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=sigma, sampling_prob=q, value_discretization_interval=PLD_DISCRETIZATION
    )


@functools.lru_cache(maxsize=256)
def _pld(groups: tuple[Group, ...]) -> privacy_loss_distribution.PrivacyLossDistribution:
    pld = _pld_step(*groups[0][:2]).self_compose(groups[0][2])
    for q, sigma, count in groups[1:]:
        pld = pld.compose(_pld_step(q, sigma).self_compose(count))
    return pld


# -- accountants ------------------------------------------------------------------------


class DPSGDAccountant(PrivacyAccountant):
    """Shared bookkeeping: groups of identical steps, validation, state, planning."""

    name: ClassVar[str]

    def __init__(self) -> None:
        self._groups: list[Group] = []

    @abc.abstractmethod
    def _epsilon(self, groups: tuple[Group, ...], delta: float) -> float:
        """Epsilon of a non-empty tuple of groups."""

    @abc.abstractmethod
    def _delta(self, groups: tuple[Group, ...], epsilon: float) -> float:
        """Delta of a non-empty tuple of groups."""

    @abc.abstractmethod
    def _fresh_dp_accountant(self) -> Any:
        """An empty dp-accounting accountant of this kind, for calibration."""

    @property
    def neighbouring_relation(self) -> str:
        return NEIGHBOURING_RELATION

    @property
    def steps(self) -> int:
        return sum(count for _, _, count in self._groups)

    @property
    def groups(self) -> tuple[Group, ...]:
        return tuple(self._groups)

    def compose_step(self, sampling_rate: float, noise_multiplier: float, count: int = 1) -> None:
        q = check_sampling_rate(sampling_rate)
        sigma = check_noise_multiplier(noise_multiplier)
        count = check_steps(count)
        if count == 0:
            return
        if self._groups and self._groups[-1][:2] == (q, sigma):
            self._groups[-1] = (q, sigma, self._groups[-1][2] + count)
        else:
            self._groups.append((q, sigma, count))

    def get_epsilon(self, delta: float) -> float:
        delta = check_delta(delta)
        return self._epsilon(self.groups, delta) if self._groups else 0.0

    def get_delta(self, epsilon: float) -> float:
        epsilon = check_epsilon(epsilon)
        return self._delta(self.groups, epsilon) if self._groups else 0.0

    def epsilon_with(self, sampling_rate: float, noise_multiplier: float, steps: int, delta: float) -> float:
        """Epsilon after ``steps`` more steps at (q, sigma), without composing them."""
        trial = type(self)()
        trial._groups = list(self._groups)
        trial.compose_step(sampling_rate, noise_multiplier, steps)
        return trial.get_epsilon(delta)

    def state(self) -> dict[str, Any]:
        return {
            "accountant": self.name,
            "version": STATE_VERSION,
            "neighbouring_relation": NEIGHBOURING_RELATION,
            "groups": [[q, sigma, count] for q, sigma, count in self._groups],
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION:
            raise UsageError(f"not a version-{STATE_VERSION} accountant state")
        if state.get("neighbouring_relation") != NEIGHBOURING_RELATION:
            raise UsageError(
                f"accountant state is for another neighbouring relation: {state.get('neighbouring_relation')}"
            )
        groups = state.get("groups")
        if not isinstance(groups, list) or not all(isinstance(g, list) and len(g) == 3 for g in groups):
            raise UsageError("accountant state: 'groups' must be a list of [q, sigma, count]")
        restored = type(self)()
        for q, sigma, count in groups:
            restored.compose_step(q, sigma, count)
        self._groups = restored._groups

    def calibrate_noise_multiplier(
        self, target_epsilon: float, delta: float, sampling_rate: float, steps: int
    ) -> float:
        """The smallest sigma (within 1e-4) whose epsilon after ``steps`` more steps is <= target.

        Uses dp-accounting's ``calibrate_dp_mechanism`` (Brent's method, its
        default bracket search) with a fresh accountant of this kind; the answer
        is then checked and, if the search stopped a hair on the wrong side,
        raised in steps of the tolerance until it meets the target.
        """
        target_epsilon, delta = check_epsilon(target_epsilon), check_delta(delta)
        q, steps = check_sampling_rate(sampling_rate), check_steps(steps, minimum=1)
        if self._groups and self.get_epsilon(delta) >= target_epsilon:
            raise UsageError(f"the budget epsilon={target_epsilon:g} is already spent")
        prior = list(self._groups)

        def event(sigma: float) -> dp_event.DpEvent:
            return groups_event([*prior, (q, sigma, steps)])

        try:
            with _quiet_absl():
                sigma = mechanism_calibration.calibrate_dp_mechanism(
                    self._fresh_dp_accountant, event, target_epsilon, delta, tol=CALIBRATION_TOLERANCE
                )
        except mechanism_calibration.NoBracketIntervalFoundError:
            raise UsageError(
                f"epsilon={target_epsilon:g} cannot be met in {steps} steps at q={q:g} with any noise multiplier"
            ) from None
        sigma = float(sigma)
        step = CALIBRATION_TOLERANCE
        while self.epsilon_with(q, sigma, steps, delta) > target_epsilon:
            sigma += step
        return sigma

    def max_steps(self, noise_multiplier: float, sampling_rate: float, delta: float, target_epsilon: float) -> int:
        """The most further steps at (q, sigma) whose epsilon stays <= target (exact, by bisection)."""
        sigma, q = check_noise_multiplier(noise_multiplier), check_sampling_rate(sampling_rate)
        delta, target_epsilon = check_delta(delta), check_epsilon(target_epsilon)

        def fits(n: int) -> bool:
            return n == 0 or self.epsilon_with(q, sigma, n, delta) <= target_epsilon

        if not fits(0) or (self._groups and self.get_epsilon(delta) > target_epsilon):
            return 0
        low, high = 0, 1
        while fits(high):
            low, high = high, high * 2
            if high > 10**9:
                return low
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if fits(mid) else (low, mid)
        return low


class RdpAccountant(DPSGDAccountant):
    """Rényi-DP accounting (dp-accounting ``RdpAccountant``, default orders)."""

    name = "rdp"

    def _epsilon(self, groups: tuple[Group, ...], delta: float) -> float:
        orders, rdp = _rdp_total(groups)
        with _quiet_absl():
            return float(rdp_privacy_accountant.compute_epsilon(orders, rdp, delta)[0])

    def _delta(self, groups: tuple[Group, ...], epsilon: float) -> float:
        orders, rdp = _rdp_total(groups)
        with _quiet_absl():
            return float(rdp_privacy_accountant.compute_delta(orders, rdp, epsilon)[0])

    def _fresh_dp_accountant(self) -> Any:
        return rdp_privacy_accountant.RdpAccountant()


class PldAccountant(DPSGDAccountant):
    """Privacy-loss-distribution accounting: the tight numerical accountant (also served as ``prv``)."""

    name = "pld"

    def _epsilon(self, groups: tuple[Group, ...], delta: float) -> float:
        return float(_pld(groups).get_epsilon_for_delta(delta))

    def _delta(self, groups: tuple[Group, ...], epsilon: float) -> float:
        return float(_pld(groups).get_delta_for_epsilon(epsilon))

    def _fresh_dp_accountant(self) -> Any:
        return pld_privacy_accountant.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
