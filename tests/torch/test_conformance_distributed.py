"""The conformance suite's distributed checks fail torch backends that get the multi-worker DP step wrong.

Each broken backend (tests/mocks/torch_distributed_backends.py) declares
``distributed``; the suite's worker processes rebuild it through the suite
classes below, which are at module level so that a worker can import them.
The real torch backend passes the same checks in tests/torch/test_conformance.py.
"""

from __future__ import annotations

import importlib.util

import pytest

from tensafe.interfaces import MLBackend
from tensafe.testing import fresh_plugin_manager
from tensafe.testing.distributed import coordinates_to_tell_apart
from tensafe.testing.noise_bounds import variance_ratio_bounds, variance_ratio_floor
from tests.mocks.torch_distributed_backends import MisdistributedTorchPlugin
from tests.torch import test_conformance


class _Suite(test_conformance.TestTorchConformance):
    def new_backend(self) -> MLBackend:
        backend: MLBackend = fresh_plugin_manager(plugins=[MisdistributedTorchPlugin()]).registry.ml_backend(
            self.backend_name
        )
        return backend


class _NoiseOnEveryWorkerSuite(_Suite):
    backend_name = "torch-noise-on-every-worker"


class _UnsummedSuite(_Suite):
    backend_name = "torch-unsummed"


class _LocalBatchSuite(_Suite):
    backend_name = "torch-local-batch"


def test_noise_added_on_every_worker_fails_the_noise_check() -> None:
    suite = _NoiseOnEveryWorkerSuite()
    with pytest.raises(AssertionError, match=r"has std 1\.4\d+ times sigma \* C / B.*noise added on every worker"):
        suite.test_distributed_noise_is_added_once_for_all_workers(suite.new_backend())


def test_unsummed_gradients_fail_the_sum_check() -> None:
    suite = _UnsummedSuite()
    with pytest.raises(AssertionError, match=r"moved the noised gradient by 1(\.0+)? C / B, but .* give 3 C / B"):
        suite.test_distributed_step_sums_every_workers_clipped_gradients(suite.new_backend())


def test_dividing_by_the_local_batch_size_fails_the_noise_check() -> None:
    suite = _LocalBatchSuite()
    with pytest.raises(AssertionError, match=r"has std (1\.9\d|2\.0\d)\d* times sigma \* C / B.*per-worker batch size"):
        suite.test_distributed_noise_is_added_once_for_all_workers(suite.new_backend())


def test_the_noise_check_pools_enough_coordinates_to_tell_sqrt2_from_1() -> None:
    false_alarm = test_conformance.TestTorchConformance.dp_false_alarm
    n = coordinates_to_tell_apart(2.0, false_alarm)
    _, high = variance_ratio_bounds(n, false_alarm)
    assert 2.0 * variance_ratio_floor(n, false_alarm) > high  # at n both error probabilities are at most 1e-9
    _, high_before = variance_ratio_bounds(n - 1, false_alarm)
    assert 2.0 * variance_ratio_floor(n - 1, false_alarm) <= high_before  # and n is the fewest
    assert test_conformance.TestTorchConformance().distributed_noise_coordinates() >= n


def test_without_torch_the_distributed_check_fails_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    suite = test_conformance.TestTorchConformance()
    backend = suite.new_backend()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    with pytest.raises(pytest.fail.Exception, match=r"^TorchBackend declares 'distributed', .* install PyTorch"):
        suite.run_workers(backend, "noise")


def test_a_suite_class_the_workers_cannot_import_fails_with_one_line() -> None:
    class Local(test_conformance.TestTorchConformance):
        pass

    suite = Local()
    with pytest.raises(pytest.fail.Exception, match=r"must be defined at the top level of an importable module"):
        suite.run_workers(suite.new_backend(), "noise")
