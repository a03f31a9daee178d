"""DP-SGD cost in the torch backend: step time and peak memory against non-private training.

Three modes run the same model (the embedded tiny Llama), LoRA, data and
batch, each in a fresh subprocess so that peak memory is its own: non-private,
DP-SGD (noise from a CSPRNG-keyed torch generator) and DP-SGD with
``dp.secure_mode`` (Opacus' secure draw, every sample from the OS CSPRNG).
Peak memory is the rise of the process' resident high-water mark over the
steps (the mark is reset after warm-up through /proc/self/clear_refs). Prints
each mode's median step time and peak, the DP / non-DP ratios, and secure
mode's time against plain DP, and the time of an empty step (the noise draw
and AdamW, no forward or backward), which isolates what the noise costs.
Goals for DP: time <= 1.10x, memory <= 1.2x. Secure mode has no goal: it is
the opt-in price of floating-point-attack-resistant, CSPRNG-drawn noise.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

STEPS, WARMUP = 12, 2
BATCHES = (16, 64)
DP_MODES = {
    "dp": {"enabled": True, "noise_multiplier": 1.0, "target_epsilon": None},
    "dp-secure": {"enabled": True, "noise_multiplier": 1.0, "target_epsilon": None, "secure_mode": True},
}


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
    dp = DP_MODES.get(mode, {"enabled": False})
    config = RunConfig.model_validate({"backend": "torch", "dp": dp, "training": {"batch_size": batch}})
    backend = TorchBackend()
    info = backend.initialize_model(config)
    records = load_records(assets.DEFAULT_DATASET)[:batch]
    data = [tokenize_record(r, backend, info.eos_token_id, 256) for r in records]
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
    peak = float(_vm("VmHWM:") - base)
    empty = []
    for _ in range(STEPS):
        start = time.perf_counter()
        backend.optim_step(adam)  # an empty Poisson batch: noise only under DP
        empty.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "peak_bytes": peak, "empty_seconds": statistics.median(empty)}


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
        plain, private, secure = (run_child(mode, batch) for mode in ("plain", "dp", "dp-secure"))
        t_ratio = private["seconds"] / plain["seconds"]
        m_ratio = private["peak_bytes"] / max(plain["peak_bytes"], 1.0)
        print(
            f"batch {batch:3d}: non-private {plain['seconds'] * 1000:7.1f} ms/step, "
            f"peak +{plain['peak_bytes'] / 2**20:6.1f} MiB"
            f" | DP {private['seconds'] * 1000:7.1f} ms/step, peak +{private['peak_bytes'] / 2**20:6.1f} MiB"
            f" | time {t_ratio:.2f}x (goal <= 1.10), memory {m_ratio:.2f}x (goal <= 1.20)"
        )
        print(
            f"           DP + secure_mode {secure['seconds'] * 1000:7.1f} ms/step, "
            f"peak +{secure['peak_bytes'] / 2**20:6.1f} MiB"
            f" | time {secure['seconds'] / plain['seconds']:.2f}x non-private, "
            f"{secure['seconds'] / private['seconds']:.2f}x DP"
            f" | memory {secure['peak_bytes'] / max(plain['peak_bytes'], 1.0):.2f}x non-private"
        )
        print(
            f"           empty step (noise and AdamW only): non-private {plain['empty_seconds'] * 1000:6.1f} ms, "
            f"DP {private['empty_seconds'] * 1000:6.1f} ms, DP + secure_mode {secure['empty_seconds'] * 1000:6.1f} ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
