"""Data-parallel DP-SGD in the torch backend: steps per second with 1 and 2 workers (gloo on CPU).

The same DP step (``dp.clipping: lora``, noise multiplier 1) on the embedded
tiny Llama, at one fixed global batch: each worker takes its shard of the
batch (record ``i`` on worker ``i mod N``), clips per sample, the clipped sums
are reduced to worker 0, noised once and broadcast, and every worker steps
AdamW, as ``tensafe run --nproc-per-node N`` does. Each world size is started
by torchrun from this one process, the 1-worker baseline first, and each
worker runs torch on one thread. Wall time per step, the median of the
measured steps on worker 0.

Prints the machine's core count, steps per second per world size and the
ratio to the 1-worker baseline. On 2 cores that are shared with other jobs
the ratio says little: the workers compete with each other and with the
machine's load, and the ratio mixes the collectives' cost with that
contention. Scaling shows on GPUs (one per worker, NCCL) or many-core machines.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORLD_SIZES = (1, 2)
GLOBAL_BATCH, STEPS, WARMUP = 32, 12, 3
#: Torch threads per worker: two threads on two busy cores can take several times as long as one, so each
#: worker gets one and N workers use N cores.
THREADS = 1


def worker(out: Path) -> None:
    """One worker (started by torchrun): time DP steps on its shard of a fixed global batch."""
    import torch

    from tensafe.config import DPConfig, RunConfig
    from tensafe.data import load_records, tokenize_record
    from tensafe.types import AdamParams
    from tensafe_torch import assets
    from tensafe_torch.backend import TorchBackend

    torch.set_num_threads(THREADS)
    config = RunConfig(
        backend="torch",
        dp=DPConfig(target_epsilon=None, noise_multiplier=1.0, clipping="lora"),
        training={"batch_size": GLOBAL_BATCH, "micro_batch_size": GLOBAL_BATCH, "seed": 0},
        lora={"rank": 8, "seed": 0},
    )
    backend = TorchBackend(share_base=False)
    group = backend.join_workers(config)
    info = backend.initialize_model(config)
    records = load_records(assets.DEFAULT_DATASET, max_records=GLOBAL_BATCH)
    batch = [tokenize_record(r, backend, info.eos_token_id, config.model.max_seq_len) for r in records]
    shard = batch[group.rank :: group.world_size]
    times = []
    for step in range(WARMUP + STEPS):
        group.sum([0.0])  # start every step together
        started = time.perf_counter()
        backend.forward_backward(shard, "cross_entropy")
        backend.optim_step(AdamParams(learning_rate=1e-3))
        if step >= WARMUP:
            times.append(time.perf_counter() - started)
    if group.rank == 0:
        out.write_text(json.dumps({"step_s": statistics.median(times)}), encoding="utf-8")
    group.close()


def measure(world: int) -> float:
    """Median seconds per step at ``world`` workers, started by torchrun."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]
        subprocess.run(
            [*launch, __file__, "--worker", str(out)], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )
        return float(json.loads(out.read_text(encoding="utf-8"))["step_s"])


def main() -> None:
    cores = os.cpu_count() or 1
    print(
        f"cores: {cores}; global batch {GLOBAL_BATCH}, {STEPS} measured steps (median), "
        f"DP-SGD lora clipping, {THREADS} torch thread per worker"
    )
    baseline = None
    for world in WORLD_SIZES:
        seconds = measure(world)
        baseline = baseline or seconds
        print(
            f"  {world} worker{'s' if world > 1 else ' '}: {1 / seconds:6.2f} steps/s "
            f"({seconds * 1000:7.1f} ms/step), {baseline / seconds:.2f}x the 1-worker baseline"
        )
    if cores < 2 * max(WORLD_SIZES):
        print(f"  ({cores} cores: too few to show scaling; the ratio mixes the collectives' cost with contention)")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(Path(sys.argv[2]))
    else:
        main()
