"""One run on several worker processes: the records' shards, one global Poisson sample, and the leader.

Under ``tensafe run --nproc-per-node N`` (or torchrun) every worker runs the
same engine on the same config. Record ``i`` belongs to the shard of worker
``i mod world_size``, and each worker Poisson-samples only its own shard, so
every record is in exactly one worker's part of a step's batch, included with
probability ``q``: together the workers draw one global Poisson sample at the
rate the accountant charges. The backend sums the workers' clipped gradients
and adds the noise once (capability ``distributed``). Worker 0 is the leader:
it alone admits steps (veto hooks, budget) and tells the others, charges the
accountant, and writes what leaves the run.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tensafe.errors import UsageError

if TYPE_CHECKING:
    from tensafe.interfaces import WorkerGroup


class ShardSampler:
    """Poisson sampling at rate ``q`` of one worker's shard of ``n`` records, keyed by step.

    With a ``seed`` the inclusion draws of a step are a function of (seed,
    step) alone, drawn for all ``n`` records by every worker, each keeping its
    shard's: a step's global batch is the same at any world size, so a run
    resumed at another world size continues the same sequence of batches.
    Without one (``dp.secure_rng``, or ``training.seed`` None) each worker draws
    its shard's inclusions from the OS CSPRNG. No state lives between steps, so
    a checkpoint holds none.
    """

    def __init__(self, n: int, sampling_rate: float, *, rank: int, world_size: int, seed: int | None) -> None:
        if n < 1:
            raise UsageError("cannot sample from an empty dataset")
        if not 0 < sampling_rate <= 1:
            raise UsageError(f"sampling rate must be in (0, 1], got {sampling_rate}")
        if not 0 <= rank < world_size:
            raise UsageError(f"worker rank {rank} is outside a world of {world_size}")
        self.n = n
        self.sampling_rate = sampling_rate
        self.rank = rank
        self.world_size = world_size
        self.seed = seed

    def sample(self, step: int) -> list[int]:
        """This worker's records in the batch of optimizer step ``step``."""
        q, shard = self.sampling_rate, range(self.rank, self.n, self.world_size)
        if self.seed is None:
            rand = random.SystemRandom().random
            return [i for i in shard if rand() < q]
        digest = hashlib.sha256(f"tensafe poisson sample|{self.seed}|{step}".encode()).digest()
        draw = random.Random(int.from_bytes(digest, "little")).random
        included = [draw() < q for _ in range(self.n)]
        return [i for i in shard if included[i]]


@dataclass(frozen=True)
class Workers:
    """The worker group of a distributed run and this worker's sampler."""

    group: WorkerGroup
    sampler: ShardSampler

    @property
    def leader(self) -> bool:
        """Whether this worker is rank 0, the one that admits steps and releases."""
        return self.group.rank == 0
