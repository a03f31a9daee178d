"""The one-run audit's statistics: from correct membership guesses to an epsilon lower bound.

Implements the hypothesis test of Steinke, Nasr and Jagielski, "Privacy
Auditing with One (1) Training Run" (NeurIPS 2023): its bound for
(epsilon, delta)-DP (Section 5), in the form the paper's Appendix D computes
it (``p_value_DP_audit`` and ``get_eps_audit``). m canaries are each included
independently with probability 1/2; the auditor guesses membership for r of
them and v guesses are right. If the training algorithm is (epsilon, delta)-DP
then

    P[v or more right] <= beta + alpha * delta * 2m,

where beta = P[Binomial(r, p_eps) >= v] with p_eps = e^eps / (1 + e^eps) (the
accuracy of eps-DP randomised response) and
alpha = max_{1<=i<=v} P[v > Binomial(r, p_eps) >= v - i] / i.
The lower bound at confidence 1 - p is the largest epsilon whose p-value is
still below p: an algorithm that was (epsilon, delta)-DP would have produced
that many right guesses with probability below p. The number of guesses must
be fixed before the guesses are scored; choosing it afterwards from several
tries needs a correction (e.g. Bonferroni: p divided by the number tried).

Binomial probabilities are computed in log space with the standard library
(no SciPy), so the bound is the same wherever it is computed.
"""

from __future__ import annotations

import math
from functools import lru_cache

#: Largest epsilon the search considers; bounds are reported as at most this.
EPS_SEARCH_MAX = 64.0
#: Bisection stops when the bracket is narrower than this.
EPS_TOLERANCE = 1e-6


def _log_pmf(k: int, r: int, log_p: float, log_q: float) -> float:
    return math.lgamma(r + 1) - math.lgamma(k + 1) - math.lgamma(r - k + 1) + k * log_p + (r - k) * log_q


@lru_cache(maxsize=4096)
def _pmfs(r: int, eps: float) -> tuple[float, ...]:
    """P[Binomial(r, e^eps / (1 + e^eps)) = k] for k = 0..r."""
    log_p = -math.log1p(math.exp(-eps))  # log(e^eps / (1 + e^eps))
    log_q = -eps + log_p  # log(1 / (1 + e^eps))
    return tuple(math.exp(_log_pmf(k, r, log_p, log_q)) for k in range(r + 1))


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Probability of ``v`` or more right guesses out of ``r`` under any (eps, delta)-DP algorithm.

    :param m: canaries, each included independently with probability 1/2.
    :param r: guesses made (abstentions excluded).
    :param v: right guesses.
    """
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if eps < 0 or not 0 <= delta <= 1:
        raise ValueError("need eps >= 0 and 0 <= delta <= 1")
    pmf = _pmfs(r, float(eps))
    beta = math.fsum(pmf[v:])
    alpha, below = 0.0, 0.0
    for i in range(1, v + 1):
        below += pmf[v - i]  # P[v > Binomial >= v - i]
        alpha = max(alpha, below / i)
    return min(1.0, beta + alpha * delta * 2 * m)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, p: float = 0.05) -> float:
    """The largest epsilon that ``v`` right guesses out of ``r`` refute at confidence ``1 - p`` (0 if none)."""
    if not 0 < p < 1:
        raise ValueError("p (one minus the confidence) must be in (0, 1)")
    if p_value(m, r, v, 0.0, delta) >= p:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) < p:
        if high >= EPS_SEARCH_MAX:
            return EPS_SEARCH_MAX
        low, high = high, min(2 * high, EPS_SEARCH_MAX)
    while high - low > EPS_TOLERANCE:
        mid = (low + high) / 2
        if p_value(m, r, v, mid, delta) < p:
            low = mid
        else:
            high = mid
    return low


def ceiling(m: int, r: int, delta: float, p: float = 0.05) -> float:
    """The most ``r`` guesses on ``m`` canaries can certify: the bound when every guess is right.

    It grows with ``r``, so ``ceiling(m, m, ...)`` is the most ``m`` canaries can
    certify at all, however good the auditor.
    """
    return epsilon_lower_bound(m, r, r, delta, p)
