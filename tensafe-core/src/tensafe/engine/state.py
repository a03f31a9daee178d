"""Checkpoints: the backend's state and the privacy spend, written together and atomically.

A checkpoint holds what a resume needs and nothing the release gate would not
let out: the backend state (which never holds DP noise state, see
:meth:`tensafe.interfaces.MLBackend.save_state`), the spend, the released step
history, the seeded sampling RNG's state (none under the OS CSPRNG) and the RL
loop's state.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from tensafe.engine.gate import restore_rng, rng_state
from tensafe.errors import UsageError

if TYPE_CHECKING:
    from tensafe.engine.gate import StepGate
    from tensafe.engine.run import TrainingRun

CHECKPOINT_FORMAT = "tensafe-checkpoint-2"
BACKEND_STATE = "backend_state.bin"
PROGRESS = "progress.json"
CHECKPOINT_DIR = "checkpoint"


def save_checkpoint(gate: StepGate, run: TrainingRun, directory: Path) -> Path:
    """Write backend state and privacy spend together, atomically: both or neither."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.with_name(directory.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    (staging / BACKEND_STATE).write_bytes(run.backend.save_state())
    progress = {
        "format": CHECKPOINT_FORMAT,
        "run_id": run.run_id,
        "step": run.step,
        "history": run.history,
        "privacy": run.privacy.to_state() if run.privacy else None,
        # The per-update noise multiplier the run trains with: a resume (even to more steps) keeps it.
        "dp_noise_multiplier": run.config.dp.noise_multiplier if run.privacy else None,
        # Workers sample with a step-keyed sampler (no state): the checkpoint resumes at any world size.
        "rng": rng_state(run.rng) if run.workers is None else None,
        "rl": run.rl.state() if run.rl else None,
    }
    (staging / PROGRESS).write_text(json.dumps(progress), encoding="utf-8")
    previous = directory.with_name(directory.name + ".old")
    shutil.rmtree(previous, ignore_errors=True)
    if directory.exists():
        directory.rename(previous)
    staging.rename(directory)
    shutil.rmtree(previous, ignore_errors=True)
    gate.audit("checkpoint.write", str(directory), step=run.step)
    return directory


def saved_noise_multiplier(directory: Path) -> float | None:
    """The noise multiplier a checkpoint's run trained with (None if there is no readable one)."""
    try:
        progress = json.loads((directory / PROGRESS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = progress.get("dp_noise_multiplier") if isinstance(progress, dict) else None
    return float(value) if isinstance(value, int | float) and value > 0 else None


def recover_checkpoint(directory: Path) -> None:
    """Put back the previous checkpoint when a process died between :func:`save_checkpoint`'s two renames.

    The previous one is whole (the new one's staging may not be): a resume
    starts from it. A worker of a distributed run can be killed at any moment.
    """
    previous = directory.with_name(directory.name + ".old")
    if not directory.exists() and (previous / PROGRESS).is_file():
        with contextlib.suppress(OSError):  # another worker of the run may have put it back first
            previous.rename(directory)


def load_checkpoint(gate: StepGate, run: TrainingRun, directory: Path) -> None:
    """Resume ``run`` from a checkpoint: backend state, privacy spend, history and sampling RNG."""
    recover_checkpoint(directory)
    try:
        progress = json.loads((directory / PROGRESS).read_text(encoding="utf-8"))
        state = (directory / BACKEND_STATE).read_bytes()
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read checkpoint {directory}: {exc}") from None
    if not isinstance(progress, dict) or progress.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"{directory} is not a TenSafe checkpoint of this version")
    if (progress["privacy"] is None) != (run.privacy is None):
        raise UsageError("checkpoint and config disagree on whether training is differentially private")
    step = run.backend.load_state(state)
    if step != progress["step"]:
        raise UsageError(f"checkpoint is torn: backend is at step {step}, progress at {progress['step']}")
    if run.privacy is not None:
        run.privacy.restore(progress["privacy"])
        accounted = run.privacy.accountant.steps * run.privacy.updates_per_charge
        if accounted != step:
            raise UsageError(f"checkpoint is torn: {accounted} steps accounted, {step} taken")
    if run.rl is not None:
        run.rl.restore(progress.get("rl"))
    run.step = step
    run.run_id = progress["run_id"]
    run.history = progress["history"]
    restore_rng(run.rng, progress["rng"])
    gate.audit("checkpoint.load", str(directory), step=step)
