"""How a one-run audit scores its canaries: a higher score means "more likely included".

Black-box, through the public :class:`~tensafe.interfaces.MLBackend` contract
only: a canary record's loss before training minus its loss under the trained
adapter. White-box: what every step's noised gradient shows at a gradient
canary's coordinate (:class:`DiracObserver`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tensafe.interfaces import MLBackend
    from tensafe.types import Datum


def mean_losses(backend: MLBackend, data: Sequence[Datum], micro_batch: int) -> list[float]:
    """Each datum's cross-entropy per weighted token under the backend's current adapter."""
    losses: list[float] = []
    for start in range(0, len(data), micro_batch):
        chunk = data[start : start + micro_batch]
        out = backend.forward(chunk, "cross_entropy")
        for datum, output in zip(chunk, out.loss_fn_outputs, strict=True):
            weights = datum.values("weights", 1.0)
            loss = -math.fsum(w * lp for w, lp in zip(weights, output["logprobs"], strict=True))
            losses.append(loss / math.fsum(weights))
    return losses


class DiracObserver:
    """The white-box auditor of Dirac canaries, reading the noised gradient of every step.

    In units of C / B (the clipping norm over the expected batch size), a
    canary that takes part in a step adds at most 1 to its coordinate (its
    gradient clipped to C), and the noise adds N(0, sigma^2). Each canary's
    score sums, over the steps, the log-likelihood ratio of "included" (the
    canary took part with probability q, the sampling rate) to "excluded"
    (noise only). For a backend that does what DP-SGD claims this is the most
    powerful test of one canary's membership (Neyman-Pearson); a backend that
    does not clip shows canaries far above 1, one that under-noises shows them
    above its noise, and both score higher than the claim allows.
    """

    def __init__(
        self, coordinates: Sequence[int], *, sampling_rate: float, noise_multiplier: float, unit: float
    ) -> None:
        self.coordinates = list(coordinates)
        self.scores = [0.0] * len(self.coordinates)
        self._unit = unit
        self._q = sampling_rate
        self._half_inverse_variance = 1.0 / (2.0 * noise_multiplier * noise_multiplier)

    def _log_likelihood_ratio(self, x: float) -> float:
        # log(1 - q + q exp(z)) with z the Gaussian log-ratio of N(1, s^2) to N(0, s^2) at x, computed
        # without overflow for the large x of a backend that does not clip.
        z = (2.0 * x - 1.0) * self._half_inverse_variance
        if self._q >= 1.0:
            return z
        absent, present = math.log1p(-self._q), math.log(self._q) + z
        high, low = max(absent, present), min(absent, present)
        return high + math.log1p(math.exp(low - high))

    def observe(self, gradient: Sequence[float]) -> None:
        """Add one step's evidence: the noised gradient that step applied."""
        for index, coordinate in enumerate(self.coordinates):
            self.scores[index] += self._log_likelihood_ratio(gradient[coordinate] / self._unit)
