"""Torch backends that declare ``distributed`` but get the multi-worker DP step wrong, for the conformance tests.

Each differs from the torch backend only in its worker group's collectives, so
that everything else (clipping, the leader's noise, the division) is the real
thing. It imports tensafe_torch (and so torch): only the torch tests use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tensafe import hookimpl
from tensafe.config import RunConfig
from tensafe.errors import BackendError
from tensafe.hookspecs import Register
from tensafe.interfaces import WorkerGroup
from tensafe_torch.backend import TorchBackend
from tensafe_torch.distributed import TorchWorkerGroup, worker_device
from tensafe_torch.loading import resolve_device


class _NoiseOnEveryWorkerGroup(TorchWorkerGroup):
    """Each worker other than the leader noises its own clipped sum before the sum; the leader noises the total."""

    def __init__(self, backend: TorchBackend, device: torch.device, timeout_s: float) -> None:
        super().__init__(device, timeout_s)
        self._backend = backend

    def sum_to_leader(self, tensors: Sequence[torch.Tensor]) -> None:
        dp: Any = self._backend._dp
        if self.rank != 0:
            std = dp.noise_multiplier * dp.max_grad_norm
            for tensor in tensors:
                tensor.add_(torch.randn_like(tensor) * std)
        super().sum_to_leader(tensors)


class _UnsummedGroup(TorchWorkerGroup):
    """Never sums the clipped gradients: the leader noises and broadcasts its own data's alone."""

    def sum_to_leader(self, tensors: Sequence[torch.Tensor]) -> None:
        pass


class _LocalBatchGroup(TorchWorkerGroup):
    """Scales the broadcast noised sum by the world size: the division is by the per-worker batch size B / N."""

    def from_leader(self, tensors: Sequence[torch.Tensor]) -> None:
        super().from_leader(tensors)
        with torch.no_grad():
            for tensor in tensors:
                tensor.mul_(self.world_size)


class _MisjoiningTorch(TorchBackend):
    def _group(self, device: torch.device, timeout_s: float) -> TorchWorkerGroup:
        raise NotImplementedError

    def join_workers(self, config: RunConfig) -> WorkerGroup:
        if self._workers is not None:
            raise BackendError("this backend already joined its run's workers")
        device = worker_device(resolve_device(config.model.device))
        self._workers = self._group(device, config.training.worker_timeout_s)
        return self._workers


class NoiseOnEveryWorkerTorch(_MisjoiningTorch):
    """Adds the DP noise on every worker: sqrt(2) times the noise on two workers."""

    def _group(self, device: torch.device, timeout_s: float) -> TorchWorkerGroup:
        return _NoiseOnEveryWorkerGroup(self, device, timeout_s)


class UnsummedTorch(_MisjoiningTorch):
    """Forgets to sum the workers' clipped gradients: only the leader's data trains."""

    def _group(self, device: torch.device, timeout_s: float) -> TorchWorkerGroup:
        return _UnsummedGroup(device, timeout_s)


class LocalBatchTorch(_MisjoiningTorch):
    """Divides by the per-worker batch size instead of the global one."""

    def _group(self, device: torch.device, timeout_s: float) -> TorchWorkerGroup:
        return _LocalBatchGroup(device, timeout_s)


class MisdistributedTorchPlugin:
    @hookimpl
    def tensafe_register_ml_backends(self, register: Register) -> None:
        register("torch-noise-on-every-worker", NoiseOnEveryWorkerTorch)
        register("torch-unsummed", UnsummedTorch)
        register("torch-local-batch", LocalBatchTorch)
