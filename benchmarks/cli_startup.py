"""CLI start-up cost: `tensafe --help` and `tensafe plugins` against bare `python -c pass`.

Run with every plugin you want to measure installed. Prints the median wall
time of each command over several runs, the difference from bare Python and
the ratio. Goal: at most 0.3 s more than bare Python.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

RUNS = 15
GOAL_SECONDS = 0.3


def median_seconds(argv: list[str]) -> float:
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    cli = [sys.executable, "-m", "tensafe.cli.main"]
    baseline = median_seconds([sys.executable, "-c", "pass"])
    print(f"python -c pass        {baseline * 1000:7.1f} ms  (baseline, median of {RUNS})")
    worst = 0.0
    for label, argv in (("tensafe --help", [*cli, "--help"]), ("tensafe plugins", [*cli, "plugins"])):
        seconds = median_seconds(argv)
        extra = seconds - baseline
        worst = max(worst, extra)
        print(f"{label:<20}  {seconds * 1000:7.1f} ms  +{extra * 1000:6.1f} ms  ratio {seconds / baseline:5.2f}x")
    verdict = "meets" if worst <= GOAL_SECONDS else "MISSES"
    print(f"worst added start-up {worst * 1000:.1f} ms: {verdict} the {GOAL_SECONDS * 1000:.0f} ms goal")
    return 0


if __name__ == "__main__":
    sys.exit(main())
