"""DP-SGD cost in the torch backend: step time and peak memory against non-private training.

Both modes run the same model (the embedded tiny Llama), LoRA, data and
batch, each in a fresh subprocess so that peak memory is its own. Peak memory
is the rise of the process' resident high-water mark over the steps (the
mark is reset after warm-up through /proc/self/clear_refs). Prints each
mode's median step time and peak, and the DP / non-DP ratios.
Goals: time <= 1.10x, memory <= 1.2x.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

STEPS, WARMUP = 12, 2
BATCHES = (16, 64)


def _vm(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def measure(mode: str, batch: int) -> dict[str, float]:
    import torch

    from tensafe.config import RunConfig
    from tensafe.data import load_records, tokenize_record
    from tensafe.types import AdamParams
    from tensafe_torch import assets
    from tensafe_torch.backend import TorchBackend

    torch.manual_seed(0)
    dp = {"enabled": True, "noise_multiplier": 1.0, "target_epsilon": None} if mode == "dp" else {"enabled": False}
    config = RunConfig.model_validate({"backend": "torch", "dp": dp, "training": {"batch_size": batch}})
    backend = TorchBackend()
    info = backend.initialize_model(config)
    records = load_records(assets.DEFAULT_DATASET)[:batch]
    data = [tokenize_record(r, backend.encode, info.eos_token_id, 256) for r in records]
    adam = AdamParams(learning_rate=1e-3)
    times = []
    for i in range(WARMUP + STEPS):
        if i == WARMUP:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
                refs.write("5")  # reset the resident high-water mark
            base = _vm("VmRSS:")
        start = time.perf_counter()
        backend.forward_backward(data, "cross_entropy")
        backend.optim_step(adam)
        if i >= WARMUP:
            times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "peak_bytes": float(_vm("VmHWM:") - base)}


def run_child(mode: str, batch: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(batch)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print(json.dumps(measure(sys.argv[2], int(sys.argv[3]))))
        return 0
    print(f"torch backend, embedded tiny Llama, LoRA r=8 on all projections, median of {STEPS} steps")
    for batch in BATCHES:
        plain, private = run_child("plain", batch), run_child("dp", batch)
        t_ratio = private["seconds"] / plain["seconds"]
        m_ratio = private["peak_bytes"] / max(plain["peak_bytes"], 1.0)
        print(
            f"batch {batch:3d}: non-private {plain['seconds'] * 1000:7.1f} ms/step, "
            f"peak +{plain['peak_bytes'] / 2**20:6.1f} MiB"
            f" | DP {private['seconds'] * 1000:7.1f} ms/step, peak +{private['peak_bytes'] / 2**20:6.1f} MiB"
            f" | time {t_ratio:.2f}x (goal <= 1.10), memory {m_ratio:.2f}x (goal <= 1.20)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
