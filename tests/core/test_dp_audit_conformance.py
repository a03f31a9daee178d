"""The conformance suite's white-box audit fails backends whose noised gradients reveal too much.

A backend that does not clip, or adds (almost) no noise, must fail
``test_dp_white_box_audit_finds_no_violation`` with a VIOLATION; the honest
bigram backend passes it.
"""

from __future__ import annotations

import pytest

from tensafe.interfaces import MLBackend
from tensafe.testing import MLBackendConformance, fresh_plugin_manager
from tensafe.testing.dp_audit import gaussian_delta, gaussian_mu
from tests.mocks.audit_backends import AuditBigrams
from tests.mocks.nonprivate_backends import NonPrivateBigrams

CHECK = "test_dp_white_box_audit_finds_no_violation"


class _Suite(MLBackendConformance):
    def new_backend(self) -> MLBackend:
        registry = fresh_plugin_manager(plugins=[NonPrivateBigrams(), AuditBigrams()], autoload=True).registry
        backend: MLBackend = registry.ml_backend(self.backend_name)
        return backend


def run_check(name: str) -> None:
    suite = type(f"Suite_{name}", (_Suite,), {"backend_name": name})()
    getattr(suite, CHECK)(suite.make_backend())


@pytest.mark.parametrize("name", ["bigram-unclipped", "bigram-faint-noise", "bigram-noiseless"])
def test_the_audit_fails_a_backend_that_is_not_private(name: str) -> None:
    with pytest.raises(AssertionError, match="verdict: VIOLATION: lower bound exceeds the claimed epsilon") as caught:
        run_check(name)
    assert "guesses k = 800, right 800" in str(caught.value), "every guess about the canaries is right"


def test_an_honest_backend_passes() -> None:
    run_check("bigram")


def test_the_exact_gaussian_claim() -> None:
    # mu-GDP at mu = 1 has delta(1) = Phi(-1/2) - e Phi(-3/2) = 0.1269 (Dong, Roth and Su, Corollary 2.13).
    assert gaussian_delta(1.0, 1.0) == pytest.approx(0.126936, abs=1e-6)
    mu = gaussian_mu(1.0, 1e-15)
    assert gaussian_delta(mu, 1.0) == pytest.approx(1e-15, rel=1e-6)
