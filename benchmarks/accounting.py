"""Accounting cost: tensafe-privacy against calling dp-accounting directly, in the same run.

Measures epsilon after 10,000 DP-SGD steps (RDP and PLD) and one noise
calibration, each as a ratio to the same computation done straight through
dp-accounting. Goals: ratio <= 1.1x; RDP < 50 ms; PLD < 2 s. Caches are cleared
before every timed call so nothing is measured warm.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

from dp_accounting import dp_event, mechanism_calibration
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from tensafe_privacy import accountants
from tensafe_privacy.accountants import PldAccountant, RdpAccountant

Q, SIGMA, STEPS, DELTA = 0.01, 1.1, 10_000, 1e-5


def clear_caches() -> None:
    for cached in (accountants._rdp_step, accountants._rdp_total, accountants._pld, accountants._pld_step):
        cached.cache_clear()


def timed(func: Callable[[], float], repeats: int) -> tuple[float, float]:
    times, value = [], 0.0
    for _ in range(repeats):
        clear_caches()
        start = time.perf_counter()
        value = func()
        times.append(time.perf_counter() - start)
    return statistics.median(times), value


def event(sigma: float, steps: int = STEPS) -> dp_event.DpEvent:
    return dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(Q, dp_event.GaussianDpEvent(sigma)), steps)


def direct_epsilon(make: Callable[[], object]) -> float:
    accountant = make()
    accountant.compose(event(SIGMA))  # type: ignore[attr-defined]
    return float(accountant.get_epsilon(DELTA))  # type: ignore[attr-defined]


def ours_epsilon(cls: type[accountants.DPSGDAccountant]) -> float:
    accountant = cls()
    accountant.compose_step(Q, SIGMA, STEPS)
    return accountant.get_epsilon(DELTA)


def direct_calibration(make: Callable[[], object], steps: int, target: float) -> float:
    # The same search dp-accounting users write: Brent over sigma from its default bracket.
    return float(mechanism_calibration.calibrate_dp_mechanism(make, lambda s: event(s, steps), target, DELTA, tol=1e-4))


def row(label: str, ours: tuple[float, float], baseline: tuple[float, float], goal: float | None) -> None:
    (t_ours, v_ours), (t_base, v_base) = ours, baseline
    verdict = "" if goal is None else ("  meets" if t_ours <= goal else "  MISSES") + f" {goal * 1000:.0f} ms goal"
    print(
        f"{label:<28} ours {t_ours * 1000:9.1f} ms  dp-accounting {t_base * 1000:9.1f} ms  "
        f"ratio {t_ours / t_base:5.2f}x  value {v_ours:.6f} vs {v_base:.6f}{verdict}"
    )


def main() -> int:
    row(
        "RDP epsilon, 10k steps",
        timed(lambda: ours_epsilon(RdpAccountant), 7),
        timed(lambda: direct_epsilon(rdp_privacy_accountant.RdpAccountant), 7),
        0.05,
    )
    row(
        "PLD epsilon, 10k steps",
        timed(lambda: ours_epsilon(PldAccountant), 3),
        timed(lambda: direct_epsilon(pld_privacy_accountant.PLDAccountant), 3),
        2.0,
    )
    row(
        "RDP calibration, eps=3, 1k",
        timed(lambda: RdpAccountant().calibrate_noise_multiplier(3.0, DELTA, Q, 1000), 3),
        timed(lambda: direct_calibration(rdp_privacy_accountant.RdpAccountant, 1000, 3.0), 3),
        None,
    )
    row(
        "PLD calibration, eps=3, 1k",
        timed(lambda: PldAccountant().calibrate_noise_multiplier(3.0, DELTA, Q, 1000), 1),
        timed(lambda: direct_calibration(pld_privacy_accountant.PLDAccountant, 1000, 3.0), 1),
        None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
