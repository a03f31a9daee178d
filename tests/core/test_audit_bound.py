"""The one-run audit's bound against the paper's theorem, evaluated independently here.

Steinke, Nasr and Jagielski (NeurIPS 2023), Section 5: if the algorithm is
(eps, delta)-DP, m canaries are included independently with probability 1/2
and the auditor makes r guesses, then for every v

    P[W >= v] <= f(v) + 2 m delta * max_{i in 1..m} (f(v - i) - f(v)) / i,

with f(u) = P[Binomial(r, e^eps / (1 + e^eps)) >= u]. The reference below sums
exact binomial terms in 60-digit arithmetic (mpmath, which dp-accounting brings
with tensafe-core[testing]) and takes the maximum over every i up to m, as the
theorem states it; the implementation follows the paper's Appendix D, which
stops at i = v (for larger i the term only shrinks).
"""

from __future__ import annotations

import math

import mpmath
import pytest

from tensafe.auditing.bound import ceiling, epsilon_lower_bound, p_value
from tensafe.auditing.verdict import judge, rank_guesses, threshold_guesses
from tensafe.engine.ledger import AUDIT_CONSISTENT, AUDIT_VIOLATION, AuditSummary

mpmath.mp.dps = 60


def theorem_p_value(m: int, r: int, v: int, eps: float, delta: float) -> mpmath.mpf:
    p = mpmath.e ** mpmath.mpf(eps) / (1 + mpmath.e ** mpmath.mpf(eps))
    terms = [mpmath.binomial(r, k) * p**k * (1 - p) ** (r - k) for k in range(r + 1)]
    tails = [mpmath.fsum(terms[u:]) for u in range(r + 1)]  # tails[u] = f(u) for 0 <= u <= r

    def f(u: int) -> mpmath.mpf:
        return tails[max(u, 0)] if u <= r else mpmath.mpf(0)

    slack = max((f(v - i) - f(v)) / i for i in range(1, m + 1))
    return min(mpmath.mpf(1), f(v) + 2 * m * mpmath.mpf(delta) * slack)


P_VALUE_CASES = [
    (1000, 200, 190, 2.0, 1e-5),
    (1000, 100, 100, 3.0, 1 / 14400),
    (100, 20, 18, 1.0, 0.0),
    (1000, 1000, 600, 0.3, 1e-5),
    (50, 50, 50, 2.5, 1e-3),
    (200, 160, 150, 1.5, 1e-15),
    (10, 4, 0, 0.5, 0.1),
]


@pytest.mark.parametrize(("m", "r", "v", "eps", "delta"), P_VALUE_CASES)
def test_p_value_is_the_theorem(m: int, r: int, v: int, eps: float, delta: float) -> None:
    assert p_value(m, r, v, eps, delta) == pytest.approx(float(theorem_p_value(m, r, v, eps, delta)), rel=1e-9)


BOUND_CASES = [
    (1000, 200, 190, 1e-5, 0.05),
    (1000, 1000, 1000, 1 / 14400, 0.05),
    (1000, 200, 200, 1 / 14400, 0.05),
    (100, 20, 20, 0.0, 0.05),
    (1000, 800, 800, 1e-15, 1e-9),
    (1000, 200, 150, 1e-5, 0.05),
]


@pytest.mark.parametrize(("m", "r", "v", "delta", "p"), BOUND_CASES)
def test_the_lower_bound_is_where_the_p_value_reaches_p(m: int, r: int, v: int, delta: float, p: float) -> None:
    eps = epsilon_lower_bound(m, r, v, delta, p)
    assert eps > 0
    assert theorem_p_value(m, r, v, eps, delta) < p <= theorem_p_value(m, r, v, eps + 2e-6, delta)


@pytest.mark.parametrize("r", [10, 200, 1000])
def test_all_right_without_delta_has_a_closed_form(r: int) -> None:
    # P[Binomial(r, q) = r] = q^r = p gives q = p^(1/r) and eps = log(q / (1 - q)).
    q = 0.05 ** (1 / r)
    assert ceiling(1000, r, 0.0, 0.05) == pytest.approx(math.log(q / (1 - q)), abs=2e-6)


def test_what_m_canaries_can_certify() -> None:
    # The ceilings the benchmark reports next to its results (m = 1000, delta = 1 / (10 n) of the embedded data).
    delta = 1 / 14400
    assert ceiling(1000, 1000, delta) == pytest.approx(5.6169, abs=1e-4)
    assert ceiling(1000, 200, delta) == pytest.approx(3.9985, abs=1e-4)
    assert ceiling(1000, 200, delta) < ceiling(1000, 1000, delta) < ceiling(1000, 1000, 0.0)


@pytest.mark.parametrize(("r", "v"), [(0, 0), (100, 50), (100, 40)])
def test_chance_certifies_nothing(r: int, v: int) -> None:
    assert epsilon_lower_bound(1000, r, v, 1e-5) == 0.0


@pytest.mark.parametrize(("args", "p"), [((10, 11, 3), 0.05), ((10, 5, 6), 0.05), ((10, 5, 3), 1.0)])
def test_impossible_counts_are_refused(args: tuple[int, int, int], p: float) -> None:
    with pytest.raises(ValueError):
        epsilon_lower_bound(*args, 1e-5, p)


def test_guesses_take_the_extremes() -> None:
    scores = [0.5, 3.0, -1.0, 2.0, 0.0, -2.0]
    assert rank_guesses(scores, 4) == [None, True, False, True, None, False]
    assert rank_guesses(scores, 3) == [None, True, False, None, None, False]
    assert threshold_guesses(scores, 0.25) == [True, True, False, True, False, False]


def test_the_verdict_follows_the_bound() -> None:
    included = [True] * 100 + [False] * 100
    common = {"mode": "white-box", "delta": 1e-5, "accountant": "rdp", "steps": 10, "confidence": 0.95}
    perfect = judge(guesses=included, included=included, claimed_epsilon=1.0, **common)  # type: ignore[arg-type]
    assert perfect.correct == perfect.guesses == 200 and perfect.verdict == AUDIT_VIOLATION
    assert perfect.epsilon_lower_bound == pytest.approx(epsilon_lower_bound(200, 200, 200, 1e-5))
    honest = judge(guesses=included, included=included, claimed_epsilon=8.0, **common)  # type: ignore[arg-type]
    assert honest.verdict == AUDIT_CONSISTENT and honest.ceiling >= honest.epsilon_lower_bound
    with pytest.raises(ValueError, match="contradicts"):
        AuditSummary.model_validate({**perfect.model_dump(), "verdict": AUDIT_CONSISTENT})
