"""The torch backend's worker group: ``torch.distributed`` as torchrun sets it up, gloo on CPU and NCCL on GPUs.

The launcher (torchrun, or ``tensafe run --nproc-per-node``) describes the
group in the environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ...).
Gradients travel on the training device (NCCL between GPUs); the engine's
small messages, a step's go or no-go and its summed measures, travel as JSON
and float64 over gloo on the CPU. Every collective fails after
``training.worker_timeout_s``, so a worker that dies or hangs stops the others
instead of leaving them waiting; a worker the launcher stops (SIGTERM) stops
at its next collective, with its state whole.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import threading
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from tensafe.errors import BackendError, WorkersLost


def worker_device(device: torch.device) -> torch.device:
    """The device of this worker: its own GPU (``LOCAL_RANK``) when the run trains on CUDA."""
    if device.type != "cuda" or device.index is not None:
        return device
    local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(local)
    return local


class TorchWorkerGroup:
    """The worker processes of one run (an :class:`tensafe.interfaces.WorkerGroup`), and the gradients' collectives."""

    def __init__(self, device: torch.device, timeout_s: float) -> None:
        if not dist.is_available():
            raise BackendError("this torch build has no torch.distributed; train on one worker")
        if dist.is_initialized():
            raise BackendError("this process already belongs to a torch.distributed process group")
        timeout = timedelta(seconds=timeout_s)
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend, timeout=timeout, device_id=device if backend == "nccl" else None)
        except (RuntimeError, ValueError) as exc:
            raise BackendError(f"cannot join the run's other workers ({backend}): {exc}") from None
        self._control: Any = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else None
        self.backend = backend
        # The launcher stops the workers with SIGTERM when one of them failed. Dying on the spot could cut
        # the leader's report short; instead each worker stops at its next collective, where its state
        # is whole (every collective of a step comes before the update and the charge).
        self._stop_signal: int | None = None
        self._previous_handler: Any = None
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._request_stop)

    def _request_stop(self, signum: int, frame: Any) -> None:
        self._stop_signal = signum

    @contextlib.contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        """A collective whose failure (a worker died, or did not answer in time) stops the run in one line."""
        # Exit status 1 (the work failed, not the request): the launcher then names the checkpoint to resume.
        if self._stop_signal is not None:
            raise WorkersLost(f"stopped by the launcher ({signal.Signals(self._stop_signal).name}) before {what}")
        try:
            yield
        except RuntimeError as exc:  # torch.distributed.DistBackendError and its kin
            lines = str(exc).strip().splitlines() or [type(exc).__name__]
            reason = re.sub(r"^\[[^\]]*\]\s*", "", lines[0])  # gloo's "[source.cc:78] " prefix
            raise WorkersLost(f"lost the run's other workers during {what}: {reason}") from None

    @property
    def rank(self) -> int:
        return int(dist.get_rank())

    @property
    def world_size(self) -> int:
        return int(dist.get_world_size())

    def broadcast(self, value: Any) -> Any:
        payload = json.dumps(value).encode() if self.rank == 0 else b""
        size = torch.tensor([len(payload)], dtype=torch.int64)
        with self._collective("the step's admission"):
            dist.broadcast(size, src=0, group=self._control)
            buffer = (
                torch.frombuffer(bytearray(payload), dtype=torch.uint8)
                if self.rank == 0
                else torch.empty(int(size.item()), dtype=torch.uint8)
            )
            dist.broadcast(buffer, src=0, group=self._control)
        return json.loads(buffer.numpy().tobytes())

    def sum(self, values: Sequence[float]) -> list[float]:
        summed = torch.tensor(list(values), dtype=torch.float64)
        with self._collective("a sum of the step's measures"):
            dist.all_reduce(summed, group=self._control)
        return [float(v) for v in summed.tolist()]

    def sum_to_leader(self, tensors: Sequence[torch.Tensor]) -> None:
        """Sum ``tensors`` over the workers, in place on rank 0 (the others' are left undefined)."""
        flat = torch.cat([t.reshape(-1) for t in tensors])
        with self._collective("the sum of the clipped gradients"):
            dist.reduce(flat, dst=0)
        if self.rank == 0:
            _unflatten(flat, tensors)

    def sum_everywhere(self, tensors: Sequence[torch.Tensor]) -> None:
        """Sum ``tensors`` over the workers, in place on every worker."""
        flat = torch.cat([t.reshape(-1) for t in tensors])
        with self._collective("the sum of the gradients"):
            dist.all_reduce(flat)
        _unflatten(flat, tensors)

    def from_leader(self, tensors: Sequence[torch.Tensor]) -> None:
        """Overwrite ``tensors`` in place with rank 0's."""
        flat = torch.cat([t.reshape(-1) for t in tensors])
        with self._collective("the broadcast of the noised gradient"):
            dist.broadcast(flat, src=0)
        if self.rank != 0:
            _unflatten(flat, tensors)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None


def _unflatten(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    offset = 0
    with torch.no_grad():
        for tensor in tensors:
            tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()
