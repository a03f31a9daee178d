"""Lower bounds on DP-SGD's privacy loss, from Google's dp-accounting, that no accountant may undercut.

A DP-SGD step is the Poisson-subsampled Gaussian mechanism under add/remove-one
neighbouring. dp-accounting builds its privacy loss distribution from the
dominating pair of that mechanism, which one dataset and one gradient attain,
so the privacy curve is exact there. Built with optimistic rounding
(``pessimistic_estimate=False``, the privacy-buckets discretisation, which is
the one that supports it) every loss is rounded down and mass truncated from
the tails is dropped: the epsilon and delta it gives are lower bounds on the
true ones, and an accountant that reports less under-states the privacy loss.

dp-accounting is imported when a bound is first computed, never on import, so
loading plugins and collecting tests stays light.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import pytest

#: One run of identical steps: (sampling rate q, noise multiplier sigma, number of steps).
Group = tuple[float, float, int]

#: Width of the privacy-loss buckets: rounding down by at most this per step keeps the bound within
#: a few per cent of the truth for the points the suite checks, at well under a second each.
DISCRETIZATION = 1e-4


def _dp_accounting_pld() -> Any:
    try:
        from dp_accounting.pld import privacy_loss_distribution  # type: ignore[import-untyped]
    except ImportError:
        pytest.fail(
            "the accountant conformance checks compare with Google's dp-accounting: "
            "python -m pip install './tensafe-core[testing]'"
        )
    return privacy_loss_distribution


@functools.lru_cache(maxsize=64)
def _optimistic_pld(groups: tuple[Group, ...], discretization: float) -> Any:
    pld_module = _dp_accounting_pld()
    total = None
    for q, sigma, count in groups:
        step = pld_module.from_gaussian_mechanism(
            standard_deviation=sigma,
            sampling_prob=q,
            pessimistic_estimate=False,
            use_connect_dots=False,
            value_discretization_interval=discretization,
        ).self_compose(count)
        total = step if total is None else total.compose(step)
    if total is None:
        raise ValueError("no steps to account")
    return total


def epsilon_lower_bound(groups: Sequence[Group], delta: float, discretization: float = DISCRETIZATION) -> float:
    """A lower bound on the epsilon, at ``delta``, of DP-SGD steps composed as ``groups``."""
    return float(_optimistic_pld(tuple(groups), discretization).get_epsilon_for_delta(delta))


def delta_lower_bound(groups: Sequence[Group], epsilon: float, discretization: float = DISCRETIZATION) -> float:
    """A lower bound on the delta, at ``epsilon``, of DP-SGD steps composed as ``groups``."""
    return float(_optimistic_pld(tuple(groups), discretization).get_delta_for_epsilon(epsilon))
