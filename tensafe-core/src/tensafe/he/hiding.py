"""What the evaluator's masks hide from the key owner, as a number.

All masks are Gaussian, drawn from the operating system's CSPRNG, with the
standard deviations of :class:`MaskBits`. Per token and module the key owner
decrypts (see THREAT_MODEL.md):

* each A segment's slots, ``A_ij x_j + u_ij - mean(u) + t_ic / L``: the part
  orthogonal to the segment's sum is hidden by Gaussian ``u`` (sd ``2^slot``);
* each segment's sum ``P_ic + t_ic``, where ``P_ic`` is the chunk's share of
  ``(A x)_i``: hidden by Gaussian ``t_ic`` (sd ``2^row``);
* ``z = B t + M'`` with ``t_i = sum_c t_ic``: Gaussian ``M`` (sd ``2^out``).

The whole view is a Gaussian vector whose mean depends on ``x`` and whose
covariance does not, so its distance from a view that does not depend on ``x``
is that of two Gaussians with the same covariance, ``2 Phi(Delta / 2) - 1 <=
Delta / sqrt(2 pi)``, with the Mahalanobis length (conditioning ``t`` on ``z``)

    Delta^2 <= sum_ij A_ij^2 x_j^2 / 2^(2 slot) + sum_ic P_ic^2 / 2^(2 row) + ||B A x||^2 / 2^(2 out)
            <= ||x||^2 (a_col^2 / 2^(2 slot) + a_op^2 / 2^(2 row) + ba_op^2 / 2^(2 out)),

``a_col`` the largest column norm of A, ``a_op`` the largest spectral norm of
A's column chunks (A's own when a row fits one ciphertext) and ``ba_op`` the
spectral norm of ``B A``. Masks are fresh per token and module,
so views are independent and the ``Delta^2`` add up: over a session the
distance grows with the square root of the number of token-module answers, not
linearly. Not covered: CKKS encryption noise times ``x`` (below 2^-40 of the
masks) and float64 rounding of the Gaussian draws.

The norms come from the key owner (:class:`AdapterNorms`, in the encrypted
adapter's header) and cannot be checked by the evaluator: a malicious key owner
may scale ``A`` up and ``B`` down (THREAT_MODEL.md, "Malicious behaviour").
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tensafe.errors import BackendError, UsageError

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray


@dataclass(frozen=True)
class MaskBits:
    """log2 of the masks' standard deviations.

    ``slot``: each slot of a row ciphertext; ``row``: each chunk's share of a row
    sum ``t_i``; ``out``: each slot of ``e``. Decoding in float64 bounds them:
    a value of magnitude 2^k decodes with an error of about 2^(k - 46).
    """

    slot: int = 19
    row: int = 20
    out: int = 22


@dataclass(frozen=True)
class AdapterNorms:
    """Norms of one module's adapter, declared by the key owner (unverifiable by the evaluator)."""

    a_col: float
    a_op: float
    ba_op: float
    a_max: float

    @classmethod
    def of(cls, a: NDArray[np.float64], b: NDArray[np.float64], chunk: int) -> AdapterNorms:
        """The norms of ``A`` (r x d_in, its rows cut into chunks of ``chunk`` columns) and ``B``."""
        import numpy as np_

        chunks = [a[:, start : start + chunk] for start in range(0, a.shape[1], chunk)]
        return cls(
            float(np_.max(np_.linalg.norm(a, axis=0))),
            max(float(np_.linalg.norm(c, 2)) for c in chunks),
            float(np_.linalg.norm(b @ a, 2)),
            float(np_.max(np_.abs(a))),
        )

    def to_json(self) -> dict[str, float]:
        return {"a_col": self.a_col, "a_op": self.a_op, "ba_op": self.ba_op, "a_max": self.a_max}

    @classmethod
    def from_json(cls, data: Any) -> AdapterNorms:
        try:
            norms = cls(*(float(data[k]) for k in ("a_col", "a_op", "ba_op", "a_max")))
        except (KeyError, TypeError, ValueError) as exc:
            raise BackendError(f"the encrypted adapter's declared norms are malformed: {exc}") from None
        if not all(math.isfinite(v) and v >= 0 for v in norms.to_json().values()):
            raise BackendError("the encrypted adapter's declared norms must be finite and non-negative")
        return norms


def distance_squared(norms: AdapterNorms, masks: MaskBits, x_norm: float) -> float:
    """``Delta^2`` of one token's view at one module, for activations of Euclidean norm ``x_norm``."""
    return x_norm**2 * (
        (norms.a_col / 2.0**masks.slot) ** 2 + (norms.a_op / 2.0**masks.row) ** 2 + (norms.ba_op / 2.0**masks.out) ** 2
    )


def total_variation(delta_squared: float) -> float:
    """An upper bound on the statistical distance for a summed ``Delta^2`` (``Delta / sqrt(2 pi)``)."""
    return math.sqrt(delta_squared / (2 * math.pi))


class HidingBudgetExceeded(UsageError):
    """The next answer would take the session's hiding bound past the evaluator's limit."""

    code = "he_hiding_budget"


class HidingLedger:
    """The evaluator's running bound: ``Delta^2`` per module and for the session, from its own ``x``.

    With ``limit`` set, a request that would take the session's statistical
    distance past it is refused before anything is sent.
    """

    def __init__(self, masks: MaskBits, limit: float | None = None) -> None:
        self.masks = masks
        self.limit = limit
        self._modules: dict[str, float] = {}
        self.answers = 0

    def charge(self, charges: Mapping[str, tuple[AdapterNorms, NDArray[np.float64]]]) -> None:
        """Account ``{module: (norms, x rows)}`` as one round; refuse it whole if it crosses the limit."""
        import numpy as np_

        added = {
            name: sum(distance_squared(norms, self.masks, float(n)) for n in np_.linalg.norm(x, axis=1))
            for name, (norms, x) in charges.items()
        }
        after = self.session_squared + sum(added.values())
        if self.limit is not None and total_variation(after) > self.limit:
            raise HidingBudgetExceeded(
                f"this request would take the key owner's view to statistical distance {total_variation(after):.3g} "
                f"from one independent of the activations, past the limit {self.limit:.3g}; start a new session "
                "under fresh masks' budget or raise the limit"
            )
        for name, value in added.items():
            self._modules[name] = self._modules.get(name, 0.0) + value
        self.answers += sum(len(x) for _, x in charges.values())

    @property
    def session_squared(self) -> float:
        return sum(self._modules.values())

    def report(self) -> dict[str, Any]:
        """Statistical distance bounds per module and for the whole session so far."""
        return {
            "modules": {name: total_variation(value) for name, value in sorted(self._modules.items())},
            "session": total_variation(self.session_squared),
            "token_module_answers": self.answers,
        }


def gaussian(shape: tuple[int, ...], bits: float) -> NDArray[np.float64]:
    """Normal reals with standard deviation 2^bits, from the operating system's CSPRNG (Box-Muller)."""
    import numpy as np_

    count = int(math.prod(shape))
    raw = np_.frombuffer(os.urandom(16 * count), dtype="<u8").reshape(2, count) >> np_.uint64(11)
    radius = np_.sqrt(-2.0 * np_.log((raw[0].astype(np_.float64) + 1.0) * 2.0**-53))  # uniform in (0, 1]
    angle = raw[1].astype(np_.float64) * (2.0**-53 * 2.0 * math.pi)
    return (radius * np_.cos(angle) * 2.0**bits).reshape(shape)  # type: ignore[no-any-return]


#: The bound THREAT_MODEL.md states, for its reference module: d_in = d_out = 4096, r = 16, A and B entries
#: N(0, 0.02^2), activations of norm 64 (unit variance), default :class:`MaskBits`; a test recomputes it.
STATED_TOKEN_MODULE = 4e-5
STATED_TOKENS, STATED_MODULES = 4096, 64
STATED_MODULE_OVER_TOKENS = 2.5e-3
STATED_SESSION = 0.02
