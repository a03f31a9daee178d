"""Encrypted masks made ahead of time, in worker processes, so that a token waits only for the work on ``x``.

A pad (one token's masks for one module: the encrypted row masks, ``e`` and the
unmasking terms) does not depend on the activations, costs about twenty
public-key encryptions, and is used exactly once. SEAL holds Python's GIL, so
pads are made in worker processes (spawned, each with its own copy of the
public adapter; no secret key is ever there) and handed back as bytes. For
each module the pool keeps a bounded queue of ``depth`` pads in the making or
ready; taking one starts the next. A pad is never handed out twice.

Size it to the token rate with :func:`workers_for`: one worker makes about
``1 / pad_seconds`` pads a second, and each token needs one per module.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from typing import TYPE_CHECKING, Any

from tensafe.errors import UsageError

if TYPE_CHECKING:
    from tensafe.he.evaluator import PadMaker
    from tensafe.he.hiding import MaskBits
    from tensafe.interfaces import HEBackend

_WORKER: dict[str, PadMaker] = {}


def _start_worker(backend_factory: Callable[[], HEBackend], adapter: bytes, masks: MaskBits) -> None:
    from tensafe.he.evaluator import PadMaker

    _WORKER["maker"] = PadMaker(backend_factory(), adapter, masks)


def _make_pad(name: str) -> bytes:
    maker = _WORKER["maker"]
    return maker.pad_to_bytes(maker.pad(name))


def workers_for(tokens_per_second: float, modules: int, pad_seconds: float) -> int:
    """Workers that keep up with ``tokens_per_second`` tokens through ``modules`` modules, at most the CPUs."""
    if tokens_per_second <= 0 or modules < 1 or pad_seconds <= 0:
        raise UsageError("the token rate, module count and pad time must be positive")
    return max(1, min(os.cpu_count() or 1, math.ceil(tokens_per_second * modules * pad_seconds)))


class MaskPool:
    """A bounded queue of pads per module, made by ``workers`` processes from the public adapter.

    ``backend_factory`` must be importable by reference (a class or module-level
    function: it is sent to spawned processes). Close the pool (or use it as a
    context manager) to stop its workers; pads not taken are discarded.
    """

    def __init__(
        self,
        backend_factory: Callable[[], HEBackend],
        adapter: bytes,
        masks: MaskBits | None = None,
        *,
        workers: int = 1,
        depth: int = 4,
    ) -> None:
        import multiprocessing

        from tensafe.he.hiding import MaskBits

        if workers < 1 or depth < 1:
            raise UsageError("a mask pool needs at least one worker and a depth of at least one")
        self.depth = depth
        self._executor = ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(backend_factory, bytes(adapter), masks or MaskBits()),
        )
        self._queues: dict[str, deque[Future[bytes]]] = {}
        #: Pads handed out, and how many of those the caller had to wait for.
        self.taken = 0
        self.waited = 0

    def fill(self, names: list[str]) -> None:
        """Start making pads for ``names`` up to the depth (call it before the first token)."""
        for name in names:
            queue = self._queues.setdefault(name, deque())
            while len(queue) < self.depth:
                queue.append(self._executor.submit(_make_pad, name))

    def take(self, name: str, *, refill: bool = True) -> bytes:
        """The oldest pad for ``name`` (waiting for it if it is still being made); a new one is started
        unless ``refill`` is false (a caller that knows how many tokens remain)."""
        queue = self._queues.setdefault(name, deque())
        if not queue:
            queue.append(self._executor.submit(_make_pad, name))
        future = queue.popleft()
        if refill:
            queue.append(self._executor.submit(_make_pad, name))
        self.taken += 1
        if not future.done():
            self.waited += 1
        return future.result()

    def ready(self, name: str) -> int:
        """Pads for ``name`` finished and not yet taken."""
        return sum(1 for f in self._queues.get(name, ()) if f.done())

    def close(self) -> None:
        for queue in self._queues.values():
            for future in queue:
                future.cancel()
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._queues.clear()

    def __enter__(self) -> MaskPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
