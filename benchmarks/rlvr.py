"""RLVR on the embedded tiny model: rollout throughput, sampling vs update time, reward with and without DP.

Runs the shipped example (tensafe-torch's assets/rlvr.yaml: country -> city,
exact-match reward) through the orchestrator twice at the same seed, once
without DP and once with DP-RLVR (per-record clipping and noise, RDP
accountant, epsilon budget), each for the same number of steps. Prints
rollouts per second, the share of step time spent sampling rollouts vs
updating, the held-out reward before and after, and epsilon. The DP / non-DP
ratios are against the non-private run in the same process.

    python benchmarks/rlvr.py [STEPS]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

STEPS = 30


def run(dp: bool, steps: int, out: Path) -> dict[str, Any]:
    from tensafe.config import load_config
    from tensafe.orchestrator import TenSafeOrchestrator
    from tensafe_torch import assets

    config = load_config(Path(assets.__file__).parent / "rlvr.yaml")
    privacy = {"enabled": True, "target_epsilon": 8.0, "secure_rng": False} if dp else {"enabled": False}
    config = config.model_copy(
        update={
            "output_dir": out,
            "run_name": "dp" if dp else "plain",
            "dp": config.dp.model_validate(privacy),
            "training": config.training.model_copy(update={"steps": steps}),
        }
    )
    return TenSafeOrchestrator(config).run()


def summary(report: dict[str, Any]) -> dict[str, float]:
    """Throughput and reward; under DP the release gate keeps per-step timings in, so the run's wall clock is used."""
    history = report["history"]
    if any("sample_seconds" not in h for h in history):
        return {
            "rollouts_per_s": float("nan"),
            "steps_per_s": len(history) / report["seconds"],
            "sample_share": float("nan"),
            "before": report["held_out_reward"]["before"],
            "after": report["held_out_reward"]["after"],
            "epsilon": report["privacy"]["epsilon"],
        }
    sample = sum(h["sample_seconds"] for h in history)
    update = sum(h["update_seconds"] for h in history)
    rollouts = sum(h["rollouts"] for h in history)
    return {
        "rollouts_per_s": rollouts / sample if sample else 0.0,
        "steps_per_s": len(history) / (sample + update),
        "sample_share": sample / (sample + update),
        "before": report["held_out_reward"]["before"],
        "after": report["held_out_reward"]["after"],
        "epsilon": report["privacy"]["epsilon"] if report["privacy"] else float("nan"),
    }


def main() -> int:
    import torch

    torch.set_num_threads(2)
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else STEPS
    with tempfile.TemporaryDirectory() as scratch:
        plain = summary(run(False, steps, Path(scratch)))
        private = summary(run(True, steps, Path(scratch)))
    print(f"RLVR, embedded tiny Llama, country -> city, {steps} steps, seed 0, 2 threads")
    for name, s in (("non-private", plain), ("DP-RLVR", private)):
        print(
            f"{name:12s}: {s['rollouts_per_s']:7.1f} rollouts/s sampling, {s['steps_per_s']:.2f} steps/s, "
            f"sampling {s['sample_share']:.0%} / updating {1 - s['sample_share']:.0%} of step time, "
            f"held-out reward {s['before']:.3f} -> {s['after']:.3f}, epsilon {s['epsilon']:.3f}"
        )
    print(
        f"DP / non-private: step time x{plain['steps_per_s'] / private['steps_per_s']:.2f}, "
        f"reward gain {private['after'] - private['before']:+.3f} vs {plain['after'] - plain['before']:+.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
