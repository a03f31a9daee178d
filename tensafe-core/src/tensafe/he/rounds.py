"""Round trips per token: modules that read the same input share one (``Evaluator.deltas``).

An ML backend's ``lora_delta`` asks for one module's delta at a time, as its
forward pass reaches it. A layer's q, k and v projections (or its gate and up
projections) read the same hidden state, so their deltas can travel to the key
owner together. :class:`SharedInputDeltas` learns which modules do, by watching
the first forward pass (consecutive calls with equal inputs), and from then on
asks for a whole group when its first module is reached. A sibling takes the
delta computed for it only if its own input is exactly the one the group was
computed for; otherwise it asks on its own, so the result never depends on the
guess. Later layers' inputs depend on earlier layers' outputs: one round per
group of modules sharing an input is the least the protocol can do.

With ``max_answer_bytes`` a round whose answer (8 bytes per token and output of
each module) would be larger is split into several, by tokens: a long prompt's
pass then fits a transport's message limit (an HTTP server's body limit).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tensafe.he._numpy import numpy_module as _numpy

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

    from tensafe.he.evaluator import Evaluator


class SharedInputDeltas:
    """A ``delta(module, x)`` callback for ``MLBackend.lora_delta`` that batches modules sharing an input."""

    def __init__(self, evaluator: Evaluator, *, max_answer_bytes: int | None = None) -> None:
        self._evaluator = evaluator
        self.max_answer_bytes = max_answer_bytes
        #: First module of each group of modules seen reading the same input, to the group (first included).
        self.groups: dict[str, list[str]] = {}
        self._leader: dict[str, str] = {}
        self._ready: dict[str, tuple[NDArray[np.float64], NDArray[np.float64]]] = {}
        self._previous: tuple[str, NDArray[np.float64]] | None = None
        #: Round trips to the key owner, and deltas answered from a group's round.
        self.rounds = 0
        self.shared = 0

    def __call__(self, name: str, x: NDArray[np.float64]) -> NDArray[np.float64]:
        np_ = _numpy()
        ready = self._ready.pop(name, None)
        if ready is not None and ready[0].shape == x.shape and np_.array_equal(ready[0], x):
            self.shared += 1
            self._previous = (name, x)
            return ready[1]
        self._learn(name, x)
        group = self.groups.get(name, [name])
        deltas = self._deltas(group, x)
        for member in group[1:]:
            self._ready[member] = (x, deltas[member])
        self._previous = (name, x)
        return deltas[name]

    def _deltas(self, group: list[str], x: NDArray[np.float64]) -> dict[str, NDArray[np.float64]]:
        """The group's deltas for ``x``, in as many rounds as the answer size allows."""
        np_ = _numpy()
        rows = x.shape[0]
        if self.max_answer_bytes is not None:
            per_row = 8 * sum(self._evaluator.modules[m].spec.d_out for m in group)
            rows = max(1, self.max_answer_bytes // per_row)
        parts = []
        for start in range(0, max(x.shape[0], 1), rows):
            parts.append(self._evaluator.deltas({member: x[start : start + rows] for member in group}))
            self.rounds += 1
        if len(parts) == 1:
            return parts[0]
        return {member: np_.concatenate([part[member] for part in parts]) for member in group}

    def _learn(self, name: str, x: NDArray[np.float64]) -> None:
        """Put ``name`` in the group of the module called just before it, if that one read the same input."""
        np_ = _numpy()
        previous = self._previous
        if previous is None or name in self._leader or name in self.groups:
            return
        before, seen = previous
        if before == name or seen.shape != x.shape or not np_.array_equal(seen, x):
            return
        leader = self._leader.get(before, before)
        self.groups.setdefault(leader, [leader]).append(name)
        self._leader[name] = leader

    def clear(self) -> None:
        """Drop deltas computed ahead and not taken (the end of a generation)."""
        self._ready.clear()
        self._previous = None
