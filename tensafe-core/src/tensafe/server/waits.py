"""Long polls on futures, held by the event loop instead of by threads.

``GET /api/v1/futures/{id}?wait=S`` may wait up to 30 s for an operation to
finish. A thread blocked that long per request would let a few dozen polls
fill the server's thread pool and queue every other request behind them, the
health checks included. Here a wait is a coroutine awaiting an
:class:`asyncio.Event` that the session's worker thread sets (through the
event loop) when the operation finishes; only the short database reads before
and after run on threads.

Each tenant may hold :data:`MAX_WAITS_PER_TENANT` waits at once; past that a
request answers at once with the future's current status, as ``wait=0`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from anyio import to_thread

from tensafe.api import FutureInfo

#: Waits one tenant may hold at once; past it a status request does not wait.
MAX_WAITS_PER_TENANT = 16
#: The statuses after which a future never changes.
FINISHED = ("completed", "failed")


@dataclass(eq=False)
class _Waiter:
    loop: asyncio.AbstractEventLoop
    done: asyncio.Event
    outcome: FutureInfo | None = None


class FutureWaits:
    """The futures still running in this process, and the coroutines waiting for them."""

    def __init__(self, per_tenant: int = MAX_WAITS_PER_TENANT) -> None:
        self.per_tenant = per_tenant
        self._lock = threading.Lock()
        self._running: dict[str, list[_Waiter]] = {}
        self._waiting: dict[str, int] = {}

    def started(self, future_id: str) -> None:
        """The future was queued; waits on it last until :meth:`finished`."""
        with self._lock:
            self._running[future_id] = []

    def finished(self, future_id: str, outcome: FutureInfo | None = None) -> None:
        """The future's outcome is committed: wake everything waiting for it (callable from any thread).

        ``outcome``, the future as committed, is handed to the waiters so they need not read it back.
        """
        with self._lock:
            waiters = self._running.pop(future_id, [])
        for waiter in waiters:
            waiter.outcome = outcome
            with contextlib.suppress(RuntimeError):  # that loop has closed: nobody waits on it any more
                waiter.loop.call_soon_threadsafe(waiter.done.set)

    async def status(self, tenant_id: str, wait: float, read: Callable[[], FutureInfo]) -> FutureInfo:
        """``read()`` (the future's status, checked against the tenant), once it finishes or ``wait`` s pass.

        ``read`` runs on a worker thread; the wait between holds none. A
        tenant at its cap of waits gets the first status at once.
        """
        info = await to_thread.run_sync(read)
        if info.status in FINISHED or wait <= 0:
            return info
        with self._slot(tenant_id) as admitted:
            if not admitted:
                return info
            outcome = await self._until_finished(info.future_id, wait)
        return outcome if outcome is not None else await to_thread.run_sync(read)

    async def _until_finished(self, future_id: str, timeout: float) -> FutureInfo | None:
        """Wait for the future; its committed outcome when the worker handed one over."""
        entry = _Waiter(asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            waiters = self._running.get(future_id)
            if waiters is None:
                return None  # finished since it was read (or queued before this process started)
            waiters.append(entry)
        try:
            await asyncio.wait_for(entry.done.wait(), timeout)
        except TimeoutError:
            pass
        finally:
            with self._lock:
                if entry in self._running.get(future_id, ()):
                    self._running[future_id].remove(entry)
        return entry.outcome

    @contextlib.contextmanager
    def _slot(self, tenant_id: str) -> Iterator[bool]:
        """One of the tenant's waits, if it has one left (yields whether it did)."""
        with self._lock:
            admitted = self._waiting.get(tenant_id, 0) < self.per_tenant
            if admitted:
                self._waiting[tenant_id] = self._waiting.get(tenant_id, 0) + 1
        try:
            yield admitted
        finally:
            if admitted:
                with self._lock:
                    self._waiting[tenant_id] -= 1
                    if not self._waiting[tenant_id]:
                        del self._waiting[tenant_id]
