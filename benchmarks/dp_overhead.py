"""DP-SGD cost in the torch backend: step time and peak memory against non-private training.

Four modes train the same model (the embedded tiny Llama), LoRA, data and
batch: non-private; DP-SGD with per-sample gradients from Opacus' hooks
(``dp.clipping: hooks``); DP-SGD with per-sample gradients formed by the LoRA
adapters' own backward pass (``dp.clipping: lora``, what ``auto`` picks here);
and that with ``dp.secure_mode`` (Opacus' secure draw, every sample from the
OS CSPRNG). All four live in one process and take their steps in turn, so a
change in the machine's load (other jobs on a shared machine) touches each of
them alike, and each ratio is the median of per-round ratios.

Time is the process' CPU time over a step, with torch on one thread: on a
machine shared with other jobs, wall time measures the others' load as much as
the step (two torch threads on two busy cores can take ten times as long), CPU
time of one thread does not. It is measured in one process with the default
allocator. Peak memory is
measured in a second process, again all modes in turn, with glibc told to map
every allocation of 64 KiB or more on its own (``MALLOC_MMAP_THRESHOLD_``), so
that the resident set rises and falls with the live tensors; a step's peak is
the rise of the resident high-water mark over the step (the mark is reset
before it through /proc/self/clear_refs).

Prints, per batch, each mode's median step time and peak, its ratios to the
non-private step, and the time of an empty step (the noise draw and AdamW, no
forward or backward), which isolates what the noise costs. Goals for the fast
path: time <= 1.05x and memory <= 1.1x at batch 64, <= 1.3x at batch 16. Secure
mode has no goal: it is the opt-in price of floating-point-attack-resistant,
CSPRNG-drawn noise.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

STEPS, WARMUP = 16, 3
BATCHES = (16, 64)
MODES: dict[str, dict[str, Any]] = {
    "non-private": {"enabled": False},
    "hooks": {"enabled": True, "noise_multiplier": 1.0, "target_epsilon": None, "clipping": "hooks"},
    "lora": {"enabled": True, "noise_multiplier": 1.0, "target_epsilon": None, "clipping": "lora"},
    "lora+secure": {
        "enabled": True,
        "noise_multiplier": 1.0,
        "target_epsilon": None,
        "clipping": "lora",
        "secure_mode": True,
    },
}
MMAP_THRESHOLD = 1 << 16
THREADS = 1


def _vm(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _backends(batch: int) -> tuple[dict[str, Any], list[Any]]:
    import torch

    from tensafe.config import RunConfig
    from tensafe.data import load_records, tokenize_record
    from tensafe_torch import assets
    from tensafe_torch.backend import TorchBackend

    torch.manual_seed(0)
    backends: dict[str, Any] = {}
    for mode, dp in MODES.items():
        config = RunConfig.model_validate({"backend": "torch", "dp": dp, "training": {"batch_size": batch}})
        backends[mode] = TorchBackend()
        info = backends[mode].initialize_model(config)
    records = load_records(assets.DEFAULT_DATASET)[:batch]
    data = [tokenize_record(r, backends["non-private"], info.eos_token_id, 256) for r in records]
    return backends, data


def measure(kind: str, batch: int) -> dict[str, dict[str, float]]:
    """Per mode: median step time and its ratio to non-private (``time``), or median step peak (``memory``)."""
    import torch

    from tensafe.types import AdamParams

    torch.set_num_threads(THREADS)
    backends, data = _backends(batch)
    adam = AdamParams(learning_rate=1e-3)
    samples: dict[str, list[float]] = {mode: [] for mode in MODES}
    empty: dict[str, list[float]] = {mode: [] for mode in MODES}
    for round_ in range(WARMUP + STEPS):
        order = list(MODES)[round_ % len(MODES) :] + list(MODES)[: round_ % len(MODES)]
        for mode in order:
            backend = backends[mode]
            if kind == "memory":
                with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
                    refs.write("5")  # reset the resident high-water mark
                base = _vm("VmRSS:")
            start = time.process_time()
            backend.forward_backward(data, "cross_entropy")
            backend.optim_step(adam)
            value = time.process_time() - start if kind == "time" else float(_vm("VmHWM:") - base)
            if round_ >= WARMUP:
                samples[mode].append(value)
                if kind == "time":
                    start = time.process_time()
                    backend.optim_step(adam)  # an empty Poisson batch: noise only under DP
                    empty[mode].append(time.process_time() - start)
    plain = samples["non-private"]
    result: dict[str, dict[str, float]] = {}
    for mode, values in samples.items():
        result[mode] = {
            "value": statistics.median(values),
            "ratio": statistics.median(
                v / max(p, 1.0 if kind == "memory" else 1e-9) for v, p in zip(values, plain, strict=True)
            ),
        }
        if kind == "time":
            result[mode]["empty"] = statistics.median(empty[mode])
    return result


def run_child(kind: str, batch: int) -> dict[str, dict[str, float]]:
    env = dict(os.environ)
    if kind == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, str(batch)], capture_output=True, text=True, check=True, env=env
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print(json.dumps(measure(sys.argv[2], int(sys.argv[3]))))
        return 0
    print(
        f"torch backend, embedded tiny Llama, LoRA r=8 on all projections, median of {STEPS} steps per mode, "
        f"modes interleaved in one process, CPU time on {THREADS} torch thread(s)"
    )
    for batch in BATCHES:
        times, peaks = run_child("time", batch), run_child("memory", batch)
        print(f"batch {batch}:")
        for mode in MODES:
            t, m = times[mode], peaks[mode]
            print(
                f"  {mode:12s} {t['value'] * 1000:7.1f} ms/step  peak +{m['value'] / 2**20:6.1f} MiB"
                f"  | time {t['ratio']:.2f}x  memory {m['ratio']:.2f}x non-private"
                f"  | empty step {t['empty'] * 1000:5.1f} ms"
            )
    print("goals for dp.clipping lora: batch 64 time <= 1.05x, memory <= 1.10x; batch 16 both <= 1.30x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
