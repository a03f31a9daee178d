"""``tensafe run --nproc-per-node N``: start a run's workers with torch's elastic launcher, as torchrun does.

The workers are ``python -m tensafe run ...`` with the same options, one per
process, exactly what ``torchrun --nproc-per-node N -m tensafe run CONFIG``
starts; each joins the others (see :mod:`tensafe.engine.workers`). One
``--run-name`` is chosen here, so every worker agrees on the run directory.
A worker that fails stops them all; the message names it and the checkpoint
to resume from.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from tensafe.errors import MissingDependencyError, TensafeError, UsageError, WorkersLost

if TYPE_CHECKING:
    from tensafe.config import RunConfig


def launch_options(func: Any) -> Any:
    """The launcher's options of ``tensafe run`` and ``tensafe train``, named as torchrun names them."""
    func = click.option(
        "--rdzv-id", default="tensafe", show_default=True, help="Rendezvous id, the same on every node (multi-node)."
    )(func)
    func = click.option(
        "--rdzv-endpoint",
        metavar="HOST:PORT",
        help="Rendezvous endpoint, the same on every node (multi-node; e.g. the first node's address and a free port).",
    )(func)
    func = click.option(
        "--nnodes", type=click.IntRange(min=1), default=1, show_default=True, help="Machines taking part in the run."
    )(func)
    return click.option(
        "--nproc-per-node",
        type=click.IntRange(min=1),
        help="Train with N worker processes on this machine (one per GPU; gloo on CPU, NCCL on GPUs); "
        "DP-SGD stays exact: one global Poisson sample, noise added once. See docs/distributed.md.",
    )(func)


@dataclass
class Launch:
    """What ``--nproc-per-node`` and its companions asked for, and the options every worker is given."""

    command: str
    nproc_per_node: int
    nnodes: int
    rdzv_endpoint: str | None
    rdzv_id: str
    forward: list[str] = field(default_factory=list)

    def torchrun_args(self, run_name: str) -> list[str]:
        """torchrun's command line for this launch."""
        args = [f"--nproc-per-node={self.nproc_per_node}", f"--nnodes={self.nnodes}", "--max-restarts=0"]
        if self.rdzv_endpoint is None:
            if self.nnodes > 1:
                raise UsageError("a run on several nodes needs --rdzv-endpoint HOST:PORT, the same on every node")
            args += ["--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0", f"--rdzv-id={uuid.uuid4()}"]
        else:
            args += ["--rdzv-backend=c10d", f"--rdzv-endpoint={self.rdzv_endpoint}", f"--rdzv-id={self.rdzv_id}"]
        return [*args, "-m", "tensafe", self.command, *self.forward, "--run-name", run_name]

    def run(self, config: RunConfig, *, resume: Path | None) -> None:
        """Start the workers on this node and wait for them; a failed worker raises a one-line error."""
        run_name = config.run_name or time.strftime("run-%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        command = self.torchrun_args(run_name)
        try:
            from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
            from torch.distributed.launcher.api import elastic_launch
            from torch.distributed.run import config_from_args, get_args_parser
        except ImportError:
            raise MissingDependencyError("--nproc-per-node needs torch: pip install ./tensafe-torch") from None
        run_dir = resume if resume is not None else config.output_dir / run_name
        # torchrun would set 1 and warn; the cores are shared out between this node's workers instead.
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // self.nproc_per_node)))
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # the error below says it once
        args = get_args_parser().parse_args(command)
        launch_config, entrypoint, entry_args = config_from_args(args)
        try:
            elastic_launch(launch_config, entrypoint)(*entry_args)
        except ChildFailedError as exc:
            rank, failure = exc.get_first_failure()
            message = failure_message(self.command, rank, failure.exitcode, failure.signal_name(), run_dir)
            if failure.exitcode in (2, 3):  # the worker's own one-line error is above: keep its status
                error = TensafeError(message)
                error.exit_code = failure.exitcode
                raise error from None
            raise WorkersLost(message) from None


def failure_message(command: str, rank: int, exitcode: int, signal: str, run_dir: Path) -> str:
    """One line: which worker failed and how, and the checkpoint the run can resume from."""
    if exitcode in (2, 3):  # a TenSafe error the worker printed itself (a user mistake, the budget)
        return f"training worker rank {rank} stopped with the error above (exit status {exitcode}), so the run stopped"
    how = f"was killed by {signal}" if exitcode < 0 else f"exited with status {exitcode}"
    try:
        step = json.loads((run_dir / "checkpoint" / "progress.json").read_text(encoding="utf-8"))["step"]
    except (OSError, ValueError, KeyError, TypeError):
        step = None
    if step is None:
        saved = f"no checkpoint was written in {run_dir}"
    else:
        saved = f"its last checkpoint (step {step}) is intact: resume with `tensafe {command} --resume {run_dir}`"
    return f"training worker rank {rank} {how}, so the run stopped; {saved}"
