"""One worker of the noise test (tests/torch/test_distributed.py), started by torchrun.

Every worker joins the group through the torch backend and takes DP steps on
empty Poisson batches, so each applied gradient is the step's noise alone,
divided by the expected batch size. Each worker writes the gradients it applied
to ``OUT/rank-N.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tensafe.config import DPConfig, RunConfig
from tensafe.types import AdamParams
from tensafe_torch.backend import TorchBackend

SIGMA, CLIP, BATCH, STEPS = 1.5, 0.5, 4, 6


def main(out: Path) -> None:
    config = RunConfig(
        backend="torch",
        dp=DPConfig(target_epsilon=None, noise_multiplier=SIGMA, max_grad_norm=CLIP),
        training={"batch_size": BATCH, "seed": 0, "worker_timeout_s": 60},
        lora={"rank": 4, "seed": 0},
    )
    backend = TorchBackend(share_base=False)
    group = backend.join_workers(config)
    backend.initialize_model(config)
    gradients = []
    for _ in range(STEPS):
        backend.optim_step(AdamParams(learning_rate=1e-3))
        gradients.append(backend.noised_gradient())
    (out / f"rank-{group.rank}.json").write_text(json.dumps(gradients), encoding="utf-8")
    group.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
