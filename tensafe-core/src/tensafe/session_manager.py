"""How sessions run, in this process or on a server: one manager over a session store.

A session is loaded into memory (:class:`LoadedSession`) with a worker thread
that runs its operations one at a time, in submission order. Every operation
that changes a training session's state commits it to a :class:`SessionStore`
before its result is released, by compare-and-set on the step: a commit goes
through only if the stored step is the one this copy last committed, so two
copies of a session can never overwrite each other's progress or privacy
spend. A copy that ran an operation it could not commit has moved past what is
stored; it is evicted and the next operation rebuilds the session from its
last committed state.

Two stores: :class:`MemorySessionStore` for the SDK's in-process transport,
and the server's SQL store (``tensafe.server.session_store``), where a lease
with a fencing token also says which replica may commit.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from tensafe.api import ForwardBackwardRequest, OptimStepRequest, TrainStepRequest
from tensafe.errors import NotFound, OperationFailed
from tensafe.sessions import TrainingSessionCore

T = TypeVar("T")
Tx = TypeVar("Tx")
Tx_contra = TypeVar("Tx_contra", contravariant=True)

Queued = ForwardBackwardRequest | OptimStepRequest | TrainStepRequest
#: The operations queued and polled as futures, by name.
QUEUED_REQUESTS: dict[str, type[Queued]] = {
    "forward_backward": ForwardBackwardRequest,
    "optim_step": OptimStepRequest,
    "train_step": TrainStepRequest,
}


def operation_name(request: Queued) -> str:
    if isinstance(request, ForwardBackwardRequest):
        return "forward_backward"
    return "optim_step" if isinstance(request, OptimStepRequest) else "train_step"


def changes_state(operation: str) -> bool:
    """Whether an operation moves the session's committed state (a step); forward_backward only accumulates."""
    return operation != "forward_backward"


def execute(core: TrainingSessionCore, request: Queued) -> dict[str, Any]:
    """Run a queued operation on its session; the result as the caller gets it."""
    if isinstance(request, ForwardBackwardRequest):
        return core.forward_backward(request.data, request.loss_fn, request.loss_fn_config).model_dump()
    if isinstance(request, OptimStepRequest):
        return core.optim_step(request.adam_params).model_dump()
    return core.train_step(request.adam_params).model_dump()


class SessionMoved(OperationFailed):
    """The stored session moved on without this copy (another copy committed first): submit again."""

    def __init__(self, session_id: str, why: str = "moved on before this operation committed") -> None:
        super().__init__(f"session {session_id} {why}; submit it again", code="session_moved", retryable=True)


@dataclass
class LoadedSession:
    """A session loaded in this process, with the worker that runs its operations in order."""

    tenant_id: str
    kind: str
    core: Any
    worker: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(max_workers=1))
    created: float = field(default_factory=time.time)
    pending: int = 0
    #: The lease token the session was loaded under (server training sessions; see tensafe.server.replicas).
    token: int | None = None
    #: The step of the state last committed from this copy: a commit expects to find it stored.
    committed_step: int = 0
    #: Set when this copy was dropped: it must never commit again.
    evicted: bool = False
    #: Operations accepted but not yet handed to the worker, in submission order.
    unstarted: list[Callable[[], Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        """Hand every accepted operation to the worker, oldest first."""
        with self.lock:
            ready, self.unstarted = self.unstarted, []
            for work in ready:
                self.worker.submit(work)

    def submit(self, work: Callable[[], T]) -> Future[T]:
        """Queue ``work`` behind everything submitted before it; ``pending`` counts it until it finishes."""
        self.pending += 1
        future = self.worker.submit(work)
        future.add_done_callback(self._finished)
        return future

    def _finished(self, _: Future[Any]) -> None:
        self.pending -= 1


class SessionStore(Protocol[Tx_contra]):
    """Where sessions' committed states live; ``Tx`` is the store's transaction."""

    def transaction(self) -> Any:
        """A context manager yielding a transaction: committed on success, rolled back on error."""
        ...

    def commit(self, tx: Tx_contra, session_id: str, loaded: LoadedSession, *, state_changed: bool) -> None:
        """Inside ``tx``: check ``loaded`` may still write, and with ``state_changed`` store its state as the
        session's recovery point, compare-and-set on the step (else :class:`SessionMoved`)."""
        ...


class SessionManager(Generic[Tx]):
    """The sessions loaded in this process, over the store their commits go to."""

    def __init__(self, store: SessionStore[Tx]) -> None:
        self.store = store
        self.loaded: dict[str, LoadedSession] = {}
        #: Held while a session is being loaded, so that two callers do not load it twice.
        self.loading = threading.Lock()

    def get(self, session_id: str) -> LoadedSession | None:
        """The session's live copy here, if one is loaded and not evicted."""
        loaded = self.loaded.get(session_id)
        return loaded if loaded is not None and not loaded.evicted else None

    def add(self, session_id: str, loaded: LoadedSession) -> LoadedSession:
        self.loaded[session_id] = loaded
        return loaded

    def evict(self, session_id: str, loaded: LoadedSession | None = None) -> None:
        """Drop a copy that may no longer commit (it ran ahead of what is stored, or another copy took over)."""
        loaded = loaded if loaded is not None else self.loaded.get(session_id)
        if loaded is None:
            return
        loaded.evicted = True
        if self.loaded.get(session_id) is loaded:
            del self.loaded[session_id]
        loaded.worker.shutdown(wait=False)

    def call(self, loaded: LoadedSession, work: Callable[[], T]) -> T:
        """Run ``work`` in the session's order and wait for it."""
        return loaded.submit(work).result()

    def run(
        self,
        session_id: str,
        loaded: LoadedSession,
        operation: str,
        work: Callable[[], T],
        record: Callable[[Tx, T], None] | None = None,
        *,
        state_changed: bool | None = None,
    ) -> T:
        """The one path every operation takes (on the session's worker): run ``work``, then in one
        transaction commit the session (compare-and-set) and ``record`` its outcome. A read that
        changes nothing and records nothing (``sample``) opens no transaction.

        If ``work`` ran but the commit failed, the copy is evicted: the next
        operation rebuilds the session from its last committed state.
        """
        if loaded.evicted:
            raise SessionMoved(session_id, "was reloaded elsewhere")
        result = work()
        changed = changes_state(operation) if state_changed is None else state_changed
        if not changed and record is None:
            return result  # a read (sample): nothing to commit or record, so no transaction
        try:
            with self.store.transaction() as tx:
                self.store.commit(tx, session_id, loaded, state_changed=changed)
                if record is not None:
                    record(tx, result)
        except BaseException:
            self.evict(session_id, loaded)
            raise
        return result

    def close(self) -> None:
        for loaded in list(self.loaded.values()):
            loaded.worker.shutdown(wait=True)
        self.loaded.clear()


@dataclass
class _Stored:
    rebuild: Callable[[], Any]
    kind: str
    created: float
    state: tuple[bytes, dict[str, Any]] | None = None
    step: int = 0


class MemorySessionStore:
    """Committed session states in this process's memory (the SDK's in-process transport).

    A session is rebuilt from its factory and last committed state after its
    copy is evicted; named saved states live here too.
    """

    def __init__(self) -> None:
        self._sessions: dict[str, _Stored] = {}
        self._states: dict[str, tuple[bytes, dict[str, Any]]] = {}
        self._lock = threading.RLock()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self._lock:
            yield None

    def create(self, session_id: str, kind: str, rebuild: Callable[[], Any], loaded: LoadedSession) -> None:
        """Record a new session (``rebuild`` makes a fresh core) and commit ``loaded`` as its first state."""
        with self._lock:
            self._sessions[session_id] = _Stored(rebuild, kind, loaded.created)
            self.commit(None, session_id, loaded, state_changed=kind == "training")

    def commit(self, tx: None, session_id: str, loaded: LoadedSession, *, state_changed: bool) -> None:
        with self._lock:
            stored = self._stored(session_id)
            if loaded.evicted or stored.step != loaded.committed_step:
                raise SessionMoved(session_id)
            if state_changed:
                core: TrainingSessionCore = loaded.core
                stored.state, stored.step = core.snapshot(), core.step
                loaded.committed_step = core.step

    def load(self, session_id: str) -> LoadedSession:
        """A fresh copy of the session at its last committed state."""
        with self._lock:
            stored = self._stored(session_id)
            core = stored.rebuild()
            if stored.state is not None:
                core.restore(*stored.state, keep_higher_spend=False)
            return LoadedSession("", stored.kind, core, created=stored.created, committed_step=stored.step)

    def kind(self, session_id: str) -> str:
        return self._stored(session_id).kind

    def session_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._sessions, key=lambda s: self._sessions[s].created)

    def save_named(self, state_id: str, state: tuple[bytes, dict[str, Any]]) -> None:
        with self._lock:
            self._states[state_id] = state

    def named(self, state_id: str) -> tuple[bytes, dict[str, Any]]:
        with self._lock:
            if state_id not in self._states:
                raise NotFound(f"no state {state_id}")
            return self._states[state_id]

    def _stored(self, session_id: str) -> _Stored:
        if session_id not in self._sessions:
            raise NotFound(f"no session {session_id}")
        return self._sessions[session_id]
