"""Checks that a backend declaring ``distributed`` runs one DP-SGD step across its workers (docs/plugins.md).

A distributed backend's ``optim_step`` must sum every worker's clipped per-datum
gradients, add the Gaussian noise once to that sum (not once per worker),
divide by the global expected batch size B = ``training.batch_size`` and apply
the same update on every worker. These checks start ``distributed_workers``
worker processes the way torchrun does (spawned, each with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` 127.0.0.1
and a free ``MASTER_PORT`` in its environment); each rebuilds the backend with
the conformance class's own ``new_backend`` and ``dp_run_config`` (the class is
imported again in the worker, by module and name), calls ``join_workers`` and
``initialize_model`` and takes DP steps, and sends back ``noised_gradient()``:

* noise: empty steps (no data on any worker) at sigma = ``dp_noise_multiplier``
  must apply the same noised gradient on every worker, of standard deviation
  ``sigma * C / B`` in every coordinate. Noise added on each of N workers shows
  sqrt(N) times that, dividing by the per-worker batch size B / N shows N times
  that; the pooled coordinates are at least what it takes for the chi-square
  bounds to tell sqrt(2) from 1 with error probabilities ``dp_false_alarm``
  both ways (:func:`coordinates_to_tell_apart`).
* sum: worker r accumulates r + 1 copies of ``heavy_datum`` (a datum whose
  gradient is far above C), under faint noise; every worker must apply the same
  gradient, of norm ``N (N + 1) / 2 * C / B``, what one worker gives for all
  those copies together. A backend that applies the leader's gradient alone,
  averages the workers' or divides by B / N gives 1, (N + 1) / 2 or
  ``N * N (N + 1) / 2`` times ``C / B``.

The workers follow torchrun's conventions, so the checks need PyTorch installed
(they import it nowhere themselves); tensafe-core does not depend on it.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import multiprocessing
import os
import queue
import socket
import time
import traceback
from collections.abc import Sequence
from typing import Any, ClassVar

import pytest

from tensafe import capabilities
from tensafe.interfaces import MLBackend
from tensafe.testing.dp_sgd import DPRun, DPSGDConformance
from tensafe.testing.noise_bounds import (
    mean_bound,
    norm,
    norm_ceiling,
    sum_of_squares,
    variance_ratio_bounds,
    variance_ratio_floor,
)
from tensafe.testing.support import requires_capability

#: The two kinds of worker run.
NOISE, SUM = "noise", "sum"
#: Seconds the workers have to close their group and exit once they reported.
EXIT_GRACE_S = 30.0


def coordinates_to_tell_apart(variance_ratio: float, false_alarm: float) -> int:
    """Fewest pooled noise coordinates n at which the chi-square bounds tell the calibrated noise from noise
    ``variance_ratio`` times its variance: an honest backend falls outside the two-sided bounds with probability
    at most ``false_alarm``, and the stronger noise inside them with probability at most ``false_alarm`` too."""

    def enough(n: int) -> bool:
        _, high = variance_ratio_bounds(n, false_alarm)
        return variance_ratio * variance_ratio_floor(n, false_alarm) > high

    high_n = 1
    while not enough(high_n):
        high_n *= 2
    low_n = high_n // 2
    while high_n - low_n > 1:
        mid = (low_n + high_n) // 2
        low_n, high_n = (low_n, mid) if enough(mid) else (mid, high_n)
    return high_n


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _load_suite(reference: str) -> DistributedConformance:
    module, _, qualname = reference.partition(":")
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise AssertionError(
            f"cannot import the conformance class {reference} in a worker process ({exc}): define it at the top "
            "level of a module that a plain import finds (pytest's default import mode)"
        ) from None
    suite: DistributedConformance = obj()
    return suite


def _worker(reference: str, kind: str, rank: int, world_size: int, port: int, results: Any) -> None:
    """One worker process: its launcher's environment, the backend, the steps; the gradients or the error back."""
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "GROUP_RANK": "0",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",  # before the backend imports its libraries: one core per worker
        }
    )
    try:
        suite = _load_suite(reference)
        results.put((rank, True, suite.distributed_worker(kind, rank, world_size)))
    except BaseException as exc:  # every failure goes back to the test, which names the worker
        lines = traceback.format_exception_only(type(exc), exc)
        results.put((rank, False, (lines[-1] if lines else type(exc).__name__).strip()))


class DistributedConformance(DPSGDConformance):
    """The ``distributed`` checks; :class:`~tensafe.testing.MLBackendConformance` includes them.

    The conformance class must be importable in a worker process by its module
    and name (defined at a module's top level), since each worker rebuilds the
    backend through it.
    """

    #: Worker processes the checks start.
    distributed_workers: ClassVar[int] = 2
    #: Seconds the workers of one check may take, all together, before they are stopped and the check fails.
    distributed_timeout_s: ClassVar[float] = 300.0

    # -- the workers' side -------------------------------------------------------------

    def distributed_worker(self, kind: str, rank: int, world_size: int) -> list[float]:
        """What worker ``rank`` runs (in its own process): join, initialise, step; its noised gradients."""
        noise = self.dp_noise_multiplier if kind == NOISE else self.dp_faint_noise_multiplier
        config = self.dp_run_config(noise)
        backend = self.new_backend()
        group = backend.join_workers(config)
        try:
            assert (group.rank, group.world_size) == (rank, world_size), (
                f"join_workers returned a group of rank {group.rank} and world size {group.world_size}, but the "
                f"launcher set RANK={rank} and WORLD_SIZE={world_size}"
            )
            info = backend.initialize_model(config)
            run = DPRun(backend, config, info.trainable_parameters)
            if kind == SUM:
                return self.dp_step(run, [self.heavy_datum(backend)] * (rank + 1))
            draws: list[float] = []
            while len(draws) < self.distributed_noise_coordinates():
                draws.extend(self.dp_step(run))
            return draws
        finally:
            group.close()

    # -- the test's side ---------------------------------------------------------------

    def distributed_noise_coordinates(self) -> int:
        """Noise coordinates the noise check pools: enough to tell sqrt(2) times the noise, at the false alarm."""
        return max(self.dp_noise_coordinates, coordinates_to_tell_apart(2.0, self.dp_false_alarm))

    def run_workers(self, backend: MLBackend, kind: str) -> list[list[float]]:
        """Start the workers of one check and return each one's noised gradients, by rank."""
        name = type(backend).__name__
        if importlib.util.find_spec("torch") is None:
            pytest.fail(
                f"{name} declares 'distributed', whose conformance check starts its workers as torchrun does: "
                "install PyTorch (python -m pip install torch) to run it",
                pytrace=False,
            )
        cls = type(self)
        if "<locals>" in cls.__qualname__ or cls.__module__ == "__main__":
            pytest.fail(
                f"{cls.__qualname__} must be defined at the top level of an importable module: the distributed "
                "check rebuilds the backend through it in each worker process",
                pytrace=False,
            )
        reference = f"{cls.__module__}:{cls.__qualname__}"
        world_size = self.distributed_workers
        context = multiprocessing.get_context("spawn")
        results: Any = context.Queue()
        port = free_port()
        workers = [
            context.Process(
                target=_worker, args=(reference, kind, rank, world_size, port, results), name=f"rank-{rank}"
            )
            for rank in range(world_size)
        ]
        for worker in workers:
            worker.start()
        gradients: dict[int, list[float]] = {}
        try:
            deadline = time.monotonic() + self.distributed_timeout_s
            while len(gradients) < world_size:
                try:
                    rank, ok, payload = results.get(timeout=0.5)
                except queue.Empty:
                    gone = [r for r, w in enumerate(workers) if r not in gradients and w.exitcode is not None]
                    if gone and results.empty():
                        time.sleep(0.5)  # what it sent just before it exited may still be on its way
                        if results.empty():
                            rank = gone[0]
                            raise AssertionError(
                                f"{name} worker rank {rank} exited with status {workers[rank].exitcode} without "
                                "reporting"
                            ) from None
                    assert time.monotonic() < deadline, (
                        f"{name}'s {world_size} workers did not finish the {kind} check in "
                        f"{self.distributed_timeout_s:g} s: a collective waits for a worker that never makes it"
                    )
                    continue
                assert ok, f"{name} worker rank {rank} of {world_size} failed: {payload}"
                gradients[rank] = payload
        finally:
            for worker in workers:
                worker.join(timeout=EXIT_GRACE_S if len(gradients) == world_size else 0.1)
            for worker in workers:
                if worker.is_alive():
                    worker.kill()
                    worker.join()
            results.close()
            results.join_thread()
        return [gradients[rank] for rank in range(world_size)]

    def assert_same_on_every_worker(self, gradients: Sequence[Sequence[float]], std: float, what: str) -> None:
        leader = gradients[0]
        for rank, other in enumerate(gradients[1:], start=1):
            assert len(other) == len(leader), (
                f"{what}: worker {rank} applied {len(other)} gradient coordinates and worker 0 {len(leader)}"
            )
            gap = max((abs(a - b) for a, b in zip(leader, other, strict=True)), default=0.0)
            assert gap <= self.dp_norm_rtol * std, (
                f"{what}: worker {rank} applied a different noised gradient from worker 0 (coordinates differ by up "
                f"to {gap:.4g}; the noise's std is {std:.4g}): each worker added noise of its own, or did not apply "
                "the leader's noised sum. The noise must be added once, to the sum of every worker's clipped "
                "gradients, and every worker must apply that same noised gradient"
            )

    @requires_capability(capabilities.DP_PROBE)
    @requires_capability(capabilities.DP_SGD)
    @requires_capability(capabilities.DISTRIBUTED)
    def test_distributed_noise_is_added_once_for_all_workers(self, backend: MLBackend) -> None:
        n_workers = self.distributed_workers
        config = self.dp_run_config(self.dp_noise_multiplier)
        sigma, clip, batch = self.dp_noise_multiplier, config.dp.max_grad_norm, config.training.batch_size
        std = sigma * clip / batch
        gradients = self.run_workers(backend, NOISE)
        self.assert_same_on_every_worker(gradients, std, f"empty DP steps on {n_workers} workers")
        draws = gradients[0]
        n = len(draws)
        ratio = sum_of_squares(draws) / (n * std * std)
        low, high = variance_ratio_bounds(n, self.dp_false_alarm)
        setting = (
            f"sigma = {sigma:g}, C = {clip:g}, B = training.batch_size = {batch}, {n_workers} workers, {n} coordinates"
        )
        assert low <= ratio <= high, (
            f"the noise of empty DP steps on {n_workers} workers has std {math.sqrt(ratio):.4f} times "
            f"sigma * C / B = {std:.6g}, outside [{math.sqrt(low):.4f}, {math.sqrt(high):.4f}] ({setting}; an honest "
            f"backend falls outside with probability {self.dp_false_alarm:g}): noise added on every worker gives "
            f"sqrt({n_workers}) = {math.sqrt(n_workers):.4f} times, dividing by the per-worker batch size B / "
            f"{n_workers} gives {n_workers} times. Add Gaussian noise of std sigma * C once, to the sum of every "
            "worker's clipped gradients, and divide by the global expected batch size B"
        )
        mean, limit = math.fsum(draws) / n, mean_bound(n, std, self.dp_false_alarm)
        assert abs(mean) <= limit, (
            f"the noise of empty DP steps on {n_workers} workers has mean {mean:.4g}; centred noise of std "
            f"{std:.6g} stays within {limit:.4g} except with probability {self.dp_false_alarm:g} ({setting})"
        )

    @requires_capability(capabilities.DP_PROBE)
    @requires_capability(capabilities.DP_SGD)
    @requires_capability(capabilities.DISTRIBUTED)
    def test_distributed_step_sums_every_workers_clipped_gradients(self, backend: MLBackend) -> None:
        n_workers = self.distributed_workers
        config = self.dp_run_config(self.dp_faint_noise_multiplier)
        clip, batch = config.dp.max_grad_norm, config.training.batch_size
        faint = self.dp_faint_noise_multiplier * clip / batch
        gradients = self.run_workers(backend, SUM)
        copies = n_workers * (n_workers + 1) // 2
        unit = clip / batch
        bound = copies * unit
        self.assert_same_on_every_worker(gradients, bound, f"DP steps on {n_workers} workers with heavy data on each")
        gradient = gradients[0]
        slack = bound * self.dp_norm_rtol + norm_ceiling(len(gradient), faint, self.dp_false_alarm)
        actual = norm(gradient)
        placed = ", ".join(f"{r + 1} on worker {r}" for r in range(n_workers))
        assert abs(actual - bound) <= slack, (
            f"heavy data ({placed}; each one's gradient far above the clipping norm) moved the noised gradient by "
            f"{actual / unit:.4g} C / B, but clipped to C each, summed over the workers and divided by the global "
            f"expected batch size they give {copies} C / B (C = {clip:g}, B = training.batch_size = {batch}, norm "
            f"{actual:.6g} against {bound:.6g}, tolerance {slack:.3g}): 1 C / B is the leader's data alone (the "
            f"workers' clipped gradients were not summed), {(n_workers + 1) / 2:g} C / B their average, "
            f"{n_workers * copies} C / B a division by the per-worker batch size B / {n_workers}. Sum every "
            "worker's clipped gradients and divide by B"
        )
