"""A training run's data: the protected training set, the held-out set, public probes, and the live run.

The guarantee covers the training records, one JSONL record being the unit.
The held-out split is decided per record (:func:`tensafe.data.held_out`) or
given as its own file (``data.eval_path``); held-out records are outside the
guarantee and the report names them by line number. Probes are public prompts,
not records: they show what training changed without showing a record.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tensafe.data import PoissonSampler, Record, load_records, split_records
from tensafe.errors import UsageError

if TYPE_CHECKING:
    from tensafe.config import RunConfig
    from tensafe.engine.gate import StepGate
    from tensafe.engine.ledger import PrivacyLedger
    from tensafe.engine.workers import Workers
    from tensafe.interfaces import MLBackend
    from tensafe.types import Datum, ModelInfo

#: Where probe prompts came from, as the report says it.
PROBES_CONFIGURED = "public probe prompts from data.probes"
PROBES_BACKEND = "the ML backend's public probe prompts"


@dataclass(frozen=True)
class RunData:
    """The records of a run, split, and the public probes that go with them."""

    source: Path
    train: list[Record]
    held_out: list[Record]
    held_out_source: Path
    probes: list[str]
    probe_source: str


def load_run_data(config: RunConfig, backend: MLBackend) -> RunData:
    """Read the configured (or the backend's default) data, split it, and choose the probes."""
    data = config.data
    path = data.path or backend.default_dataset()
    if path is None:
        raise UsageError(f"no dataset configured and ML backend {config.backend!r} ships none; set data.path")
    records = load_records(Path(path), max_records=data.max_records)
    if data.eval_path is not None:
        train, held = records, load_records(data.eval_path)
    else:
        train, held = split_records(records, data.eval_fraction)
    if data.probes is not None:
        probes, source = list(data.probes), PROBES_CONFIGURED
    elif data.path is None:
        probes, source = backend.default_probes(), PROBES_BACKEND
    else:
        probes, source = [], ""
    return RunData(Path(path), train, held, data.eval_path or Path(path), probes, source)


class RunStrategy(Protocol):
    """A step other than supervised training (the RLVR loop): what the engine needs of it."""

    had_signal: bool

    def state(self) -> dict[str, Any]: ...

    def restore(self, state: dict[str, Any] | None) -> None: ...

    def train_step(self, gate: StepGate, run: TrainingRun) -> dict[str, float]: ...

    def held_out_reward(self, backend: MLBackend, records: list[Record]) -> float | None: ...


@dataclass
class TrainingRun:
    """A live training run: backend, data, privacy ledger and step counter."""

    run_id: str
    config: RunConfig
    backend: MLBackend
    info: ModelInfo
    data: RunData
    train_data: list[Datum]
    eval_data: list[Datum]
    sampler: PoissonSampler
    rng: random.Random
    privacy: PrivacyLedger | None
    #: The RL loop and its state, for ``mode: rlvr``.
    rl: RunStrategy | None = None
    #: The worker group, when the run is one of several worker processes (``--nproc-per-node``, torchrun).
    workers: Workers | None = None
    step: int = 0
    #: Released step metrics (what passed the release gate), one entry per step.
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def leader(self) -> bool:
        """Whether this process admits steps and releases (the only one, or rank 0 of several)."""
        return self.workers is None or self.workers.leader

    @property
    def train_records(self) -> list[Record]:
        return self.data.train

    @property
    def eval_records(self) -> list[Record]:
        return self.data.held_out
