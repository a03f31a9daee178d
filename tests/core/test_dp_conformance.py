"""The conformance suite's DP-SGD checks fail backends that declare dp_sgd but are not private.

Each non-private bigram variant (tests/mocks/nonprivate_backends.py) breaks
DP-SGD in one way; the check meant for that flaw must fail it. The honest
bigram backend passes the whole suite (test_bigram_conformance.py).
"""

from __future__ import annotations

import re

import pytest

from tensafe.interfaces import MLBackend
from tensafe.testing import MLBackendConformance, fresh_plugin_manager
from tests.mocks.nonprivate_backends import NonPrivateBigrams

#: (registered variant, the conformance check that must fail it, a phrase of its failure message)
CAUGHT = [
    ("bigram-unclipped", "test_dp_clips_a_datum_to_the_clipping_norm", "allows at most 1 * C / B"),
    ("bigram-unclipped", "test_dp_bounds_distinct_data_by_their_count", "allows at most 3 * C / B"),
    ("bigram-batch-clipped", "test_dp_clips_each_datum_separately", "clips the sum rather than each datum"),
    ("bigram-faint-noise", "test_dp_empty_step_noise_has_the_calibrated_std", "the noise of empty DP steps has std"),
    ("bigram-faint-noise", "test_dp_fresh_backends_draw_independent_noise", "two fresh backends"),
    ("bigram-under-noised", "test_dp_empty_step_noise_has_the_calibrated_std", "the noise of empty DP steps has std"),
    ("bigram-under-noised", "test_dp_fresh_backends_draw_independent_noise", "two fresh backends"),
    ("bigram-uniform-noise", "test_dp_noise_is_centred_gaussian", "in Kolmogorov distance"),
    ("bigram-constant-seed", "test_dp_fresh_backends_draw_independent_noise", "two fresh backends"),
    ("bigram-persisted-noise", "test_dp_resumed_backend_draws_fresh_noise", "restored from another's save_state"),
    ("bigram-unprobed", "test_dp_sgd_declares_dp_probe", "declares dp_sgd but not dp_probe"),
]

#: Checks a variant passes: each flaw is caught by the check aimed at it, not by accident.
MISSED = [
    ("bigram-uniform-noise", "test_dp_empty_step_noise_has_the_calibrated_std"),
    ("bigram-constant-seed", "test_dp_resumed_backend_draws_fresh_noise"),
    ("bigram-persisted-noise", "test_dp_fresh_backends_draw_independent_noise"),
    ("bigram-batch-clipped", "test_dp_clips_a_datum_to_the_clipping_norm"),
]


class NonPrivateBigramSuite(MLBackendConformance):
    """The conformance suite over a variant registered by the test rather than by an entry point."""

    def new_backend(self) -> MLBackend:
        registry = fresh_plugin_manager(plugins=[NonPrivateBigrams()]).registry
        backend: MLBackend = registry.ml_backend(self.backend_name)
        return backend


def run_check(name: str, check: str) -> None:
    """Run one conformance check, as pytest would, against the variant registered as ``name``."""
    suite = type(f"Suite_{name}", (NonPrivateBigramSuite,), {"backend_name": name})()
    getattr(suite, check)(suite.make_backend())


@pytest.mark.parametrize(("name", "check", "reason"), CAUGHT, ids=[f"{n}-{c}" for n, c, _ in CAUGHT])
def test_the_check_fails_a_backend_that_is_not_private(name: str, check: str, reason: str) -> None:
    with pytest.raises(AssertionError, match=re.escape(reason)):
        run_check(name, check)


@pytest.mark.parametrize(("name", "check"), MISSED, ids=[f"{n}-{c}" for n, c in MISSED])
def test_other_checks_pass_the_variant(name: str, check: str) -> None:
    run_check(name, check)
