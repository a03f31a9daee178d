"""A white-box privacy audit among the DP-SGD checks: the noised gradients must not reveal more than the noise allows.

For backends that declare ``dp_sgd``, ``dp_probe`` and ``gradient_canaries``.
The check runs the one-run audit of :mod:`tensafe.auditing` in a setting whose
privacy is known exactly, so it needs no accountant: ``dp_audit_canaries``
Dirac canaries of norm ``dp_audit_canary_norm * C``, each included with
probability 1/2, every included one in every step (sampling rate 1), for
``dp_audit_steps`` steps at noise multiplier sigma. To each canary that is the
Gaussian mechanism composed T times: mu-GDP with mu = sqrt(T) / sigma, whose
epsilon at delta is exact (Balle and Wang 2018; Dong, Roth and Su 2022):

    delta(eps) = Phi(-eps / mu + mu / 2) - e^eps * Phi(-eps / mu - mu / 2).

Sigma is chosen so that this is ``dp_audit_epsilon`` at ``dp_audit_delta``.
The auditor guesses "included" for the highest-scoring 40 % of the canaries
and "excluded" for the lowest 40 %; the check fails when the right guesses
certify more than the claimed epsilon at confidence ``1 - dp_audit_false_alarm``.
By the audit's theorem an honest backend fails with probability at most
``dp_audit_false_alarm``. A backend that does not clip lets each canary add
``dp_audit_canary_norm`` times what clipping allows, and one without noise
shows every canary exactly: either way every guess is right, which certifies
about 3.6 with the defaults, and fails.
"""

from __future__ import annotations

import math
from typing import ClassVar

from tensafe import capabilities
from tensafe.auditing.canaries import canary_coordinates, inclusion
from tensafe.auditing.scores import DiracObserver
from tensafe.auditing.verdict import judge, rank_guesses, render
from tensafe.engine.ledger import AUDIT_CONSISTENT
from tensafe.interfaces import MLBackend
from tensafe.testing.dp_sgd import DPSGDConformance
from tensafe.testing.support import requires_capability

#: Bisection bracket for mu and its stopping width.
MU_BRACKET = (1e-6, 100.0)
MU_TOLERANCE = 1e-12


def _normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def gaussian_delta(mu: float, epsilon: float) -> float:
    """The exact delta at ``epsilon`` of a mu-GDP mechanism (the Gaussian mechanism, composed)."""
    return _normal_cdf(-epsilon / mu + mu / 2) - math.exp(epsilon) * _normal_cdf(-epsilon / mu - mu / 2)


def gaussian_mu(epsilon: float, delta: float) -> float:
    """The mu whose Gaussian mechanism is exactly (epsilon, delta)-DP (delta grows with mu)."""
    low, high = MU_BRACKET
    while high - low > MU_TOLERANCE * high:
        mid = (low + high) / 2
        if gaussian_delta(mid, epsilon) > delta:
            high = mid
        else:
            low = mid
    return low


class DPAuditConformance(DPSGDConformance):
    """The DP-SGD checks plus the white-box audit; :class:`~tensafe.testing.MLBackendConformance` includes them."""

    #: Canaries m (at most the trainable parameters), steps T, and the exact claim the noise is chosen for.
    dp_audit_canaries: ClassVar[int] = 1000
    dp_audit_steps: ClassVar[int] = 4
    dp_audit_epsilon: ClassVar[float] = 1.0
    dp_audit_delta: ClassVar[float] = 1e-15
    #: A canary's norm in clipping norms: clipping cuts it to 1.
    dp_audit_canary_norm: ClassVar[float] = 1000.0
    #: Share of the canaries guessed (half included, half excluded).
    dp_audit_guess_share: ClassVar[float] = 0.8
    #: Probability that an honest backend fails the audit.
    dp_audit_false_alarm: ClassVar[float] = 1e-9

    @requires_capability(capabilities.DP_SGD)
    @requires_capability(capabilities.DP_PROBE)
    @requires_capability(capabilities.GRADIENT_CANARIES)
    def test_dp_white_box_audit_finds_no_violation(self, backend: MLBackend) -> None:
        steps = self.dp_audit_steps
        sigma = math.sqrt(steps) / gaussian_mu(self.dp_audit_epsilon, self.dp_audit_delta)
        run = self.make_dp_backend(sigma)
        m = min(self.dp_audit_canaries, run.parameters)
        coordinates, included = canary_coordinates(m, run.parameters), inclusion(m)
        members = [c for c, s in zip(coordinates, included, strict=True) if s]
        observer = DiracObserver(coordinates, sampling_rate=1.0, noise_multiplier=sigma, unit=run.clip / run.batch_size)
        for _ in range(steps):
            if members:
                run.backend.forward_backward_canaries(members, self.dp_audit_canary_norm * run.clip)
            observer.observe(self.dp_step(run))
        summary = judge(
            mode="white-box",
            guesses=rank_guesses(observer.scores, round(self.dp_audit_guess_share * m)),
            included=included,
            claimed_epsilon=self.dp_audit_epsilon,
            delta=self.dp_audit_delta,
            accountant="exact Gaussian composition",
            steps=steps,
            confidence=1.0 - self.dp_audit_false_alarm,
        )
        assert summary.verdict == AUDIT_CONSISTENT, (
            "\n".join(render(summary)) + f"\nthe noised gradients of {steps} DP steps (noise multiplier {sigma:.4g}, "
            f"C = {run.clip:g}, B = {run.batch_size}) told which of {m} Dirac canaries of norm "
            f"{self.dp_audit_canary_norm:g} C were included better than ({self.dp_audit_epsilon:g}, "
            f"{self.dp_audit_delta:g})-DP allows: each datum's gradient must be clipped to dp.max_grad_norm and "
            "Gaussian noise of std noise_multiplier * max_grad_norm added (an honest backend fails this with "
            f"probability at most {self.dp_audit_false_alarm:g})"
        )
