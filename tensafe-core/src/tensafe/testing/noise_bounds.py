"""Finite-sample bounds on Gaussian draws, for the DP-SGD conformance checks.

Each bound takes ``false_alarm``: the probability that draws which really are
independent N(0, std^2) fall outside it. They are inequalities that hold for
every sample size, not asymptotic approximations, so a check built on one
fails an honest backend with at most that probability:

* chi-square (Laurent & Massart 2000, Lemma 1): for X ~ chi2(n) and x > 0,
  P(X >= n + 2 sqrt(n x) + 2 x) <= exp(-x) and P(X <= n - 2 sqrt(n x)) <= exp(-x);
  a noncentral chi-square (draws plus an independent offset) only lies higher.
* the mean of n draws is N(0, std^2 / n), and P(|Z| >= z) <= 2 exp(-z^2 / 2);
* Dvoretzky-Kiefer-Wolfowitz with Massart's constant (1990): the empirical
  distribution function of n draws is further than e from the true one with
  probability at most 2 exp(-2 n e^2).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence


def sum_of_squares(values: Sequence[float]) -> float:
    return math.fsum(v * v for v in values)


def norm(values: Sequence[float]) -> float:
    return math.sqrt(sum_of_squares(values))


def variance_ratio_bounds(n: int, false_alarm: float) -> tuple[float, float]:
    """``(low, high)``: the mean square of n draws over std^2 lies in it except with probability ``false_alarm``."""
    x = math.log(2.0 / false_alarm)
    spread = 2.0 * math.sqrt(n * x)
    return max(0.0, n - spread) / n, (n + spread + 2.0 * x) / n


def variance_ratio_floor(n: int, false_alarm: float) -> float:
    """One-sided: the mean square of n draws (plus any independent offset) over std^2 is below this
    with probability at most ``false_alarm``."""
    x = math.log(1.0 / false_alarm)
    return max(0.0, n - 2.0 * math.sqrt(n * x)) / n


def norm_ceiling(n: int, std: float, false_alarm: float) -> float:
    """The norm of n draws exceeds this with probability at most ``false_alarm``."""
    x = math.log(1.0 / false_alarm)
    return std * math.sqrt(n + 2.0 * math.sqrt(n * x) + 2.0 * x)


def mean_bound(n: int, std: float, false_alarm: float) -> float:
    """The mean of n draws is further than this from 0 with probability at most ``false_alarm``."""
    return std * math.sqrt(2.0 * math.log(2.0 / false_alarm) / n)


def distribution_bound(n: int, false_alarm: float) -> float:
    """The empirical distribution function of n draws is further than this from the true one
    (in the supremum norm) with probability at most ``false_alarm``."""
    return math.sqrt(math.log(2.0 / false_alarm) / (2.0 * n))


def distance_to_normal(values: Sequence[float], std: float) -> float:
    """Kolmogorov distance between the empirical distribution of ``values`` and N(0, std^2)."""
    ordered = sorted(values)
    n = len(ordered)
    scale = 1.0 / (std * math.sqrt(2.0))
    distance = 0.0
    i = 0
    while i < n:
        value = ordered[i]
        j = bisect.bisect_right(ordered, value, lo=i)  # ties: the empirical function jumps once, by their count
        normal = 0.5 * (1.0 + math.erf(value * scale))
        distance = max(distance, abs(normal - i / n), abs(j / n - normal))
        i = j
    return distance
