"""Work handed between replicas: a request for a session another replica holds goes through the database.

The receiving replica writes the request, sealed under the tenant's key, to
``work_items`` with a future row; the holder's dispatcher takes the items of
its sessions in order, runs them on the session's worker like local work, and
completes the future row. A synchronous call waits for that row here; a
queued one (forward_backward, optim_step, train_step) returns its future at
once, and a long poll on it reads the row.

The dispatcher also renews this replica's leases and takes over sessions
whose holder died (its lease expired) when work for them is waiting.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel
from sqlalchemy import delete, select, update

from tensafe.errors import OperationFailed
from tensafe.server.crypto import open_text, seal_text
from tensafe.server.db import FutureRow, SessionLease, WorkItem
from tensafe.server.operations import SYNCHRONOUS
from tensafe.server.queued import QUEUED_REQUESTS, new_future
from tensafe.server.replicas import POLL_SECONDS

if TYPE_CHECKING:
    from tensafe.server.queued import Queued
    from tensafe.server.service import SessionService
    from tensafe.session_manager import LoadedSession

#: How long a synchronous call handed to another replica may take.
CALL_TIMEOUT_S = 600.0
log = logging.getLogger("tensafe.server")


def _aad(tenant_id: str, future_id: str) -> str:
    return f"work:{tenant_id}/{future_id}"


class Handoff:
    """Hands work to the replica holding a session, and takes the work handed to this one."""

    def __init__(self, service: SessionService) -> None:
        self.service = service
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # -- the receiving side -------------------------------------------------------------

    def forward(
        self, tenant_id: str, session_id: str, operation: str, request: BaseModel, request_key: str | None = None
    ) -> FutureRow:
        """Queue ``request`` for the session's holder; returns its future row."""
        service = self.service
        with service.db() as db:
            future = new_future(tenant_id, session_id, operation, request_key)
            db.add(future)
            db.flush()
            sealed = seal_text(service.tenant_key(db, tenant_id), request.model_dump_json(), _aad(tenant_id, future.id))
            db.add(
                WorkItem(
                    future_id=future.id,
                    tenant_id=tenant_id,
                    session_id=session_id,
                    operation=operation,
                    request=sealed,
                )
            )
        return future

    def call(self, tenant_id: str, session_id: str, operation: str, request: BaseModel) -> Any:
        """A synchronous operation run by the session's holder; its response, or its error raised here."""
        from tensafe.sdk.errors import error_from

        future_id = self.forward(tenant_id, session_id, operation, request).id
        response_type = SYNCHRONOUS[operation][1]
        deadline = time.monotonic() + CALL_TIMEOUT_S
        pause = POLL_SECONDS
        while time.monotonic() < deadline:
            with self.service.db() as db:
                row = db.get(FutureRow, future_id)
                assert row is not None
                if row.status == "completed" and row.result is not None:
                    text = open_text(
                        self.service.tenant_key(db, tenant_id), row.result, f"future:{tenant_id}/{future_id}"
                    )
                    return response_type.model_validate_json(text)
                if row.status == "failed" and row.error is not None:
                    error = json.loads(row.error)
                    raise error_from(error, retryable=bool(error.get("retryable")))
            if self._thread is None:
                self.take()  # no dispatcher here (not `tensafe serve`): take the session over once its lease expires
            time.sleep(pause)
            pause = min(pause * 1.5, 0.25)
        raise OperationFailed(f"session {session_id} did not answer within {CALL_TIMEOUT_S:g} s", retryable=True)

    # -- the holding side ----------------------------------------------------------------

    def start(self) -> None:
        """Take handed work and renew leases in the background (``tensafe serve``)."""
        self._thread = threading.Thread(target=self._loop, name="tensafe-handoff", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        renewed = 0.0
        while not self._stop.wait(POLL_SECONDS):
            try:
                if time.monotonic() - renewed > self.service.leases.lease_seconds / 3:
                    with self.service.db() as db:
                        lost = self.service.leases.renew(db)
                    for session_id in lost:
                        self.service.drop(session_id)
                    renewed = time.monotonic()
                self.take()
            except Exception:  # a database hiccup must not stop the dispatcher; the next round retries
                log.exception("handing work between replicas failed; retrying")

    def take(self) -> int:
        """Start the handed work of every session this replica holds or may take over; returns how many."""
        service = self.service
        now = time.time()
        with service.db() as db:
            held_elsewhere = select(SessionLease.session_id).where(
                SessionLease.owner != service.leases.replica, SessionLease.expires > now
            )
            waiting = db.execute(
                select(WorkItem.session_id, WorkItem.tenant_id)
                .where(WorkItem.taken_by.is_(None), WorkItem.session_id.not_in(held_elsewhere))
                .distinct()
            ).all()
            # Sessions whose holder died with work in hand: taking them over reports that work failed.
            expired = select(SessionLease.session_id).where(
                SessionLease.owner != service.leases.replica, SessionLease.expires <= now
            )
            orphaned = db.execute(
                select(FutureRow.session_id, FutureRow.tenant_id)
                .where(FutureRow.status.in_(("queued", "running")), FutureRow.session_id.in_(expired))
                .distinct()
            ).all()
        for session_id, tenant_id in orphaned:
            if (session_id, tenant_id) not in waiting:
                service.holder(tenant_id, session_id)
        started = 0
        for session_id, tenant_id in waiting:
            live = service.holder(tenant_id, session_id)
            if live is None:
                continue
            with service.db() as db:
                items = (
                    db.execute(
                        select(WorkItem)
                        .where(WorkItem.session_id == session_id, WorkItem.taken_by.is_(None))
                        .order_by(WorkItem.id)
                        .with_for_update(skip_locked=True)
                    )
                    .scalars()
                    .all()
                )
                work = [(item.future_id, item.operation, item.request) for item in items]
                for item in items:
                    item.taken_by = service.leases.replica
            for future_id, operation, sealed in work:
                live.pending += 1
                with live.lock:
                    live.unstarted.append(
                        functools.partial(self._run, live, tenant_id, session_id, future_id, operation, sealed)
                    )
            live.start()
            started += len(work)
        return started

    def _run(
        self, live: LoadedSession, tenant_id: str, session_id: str, future_id: str, operation: str, sealed: str
    ) -> None:
        """Run one handed item on the session's worker, and complete its future row."""
        service = self.service
        try:
            with service.db() as db:
                text = open_text(service.tenant_key(db, tenant_id), sealed, _aad(tenant_id, future_id))
            if operation in QUEUED_REQUESTS:
                request: Queued = QUEUED_REQUESTS[operation].model_validate_json(text)
                live.pending += 1  # _run counts it down
                service._run(live, session_id, future_id, request)
                return
            request_type, _, handler = SYNCHRONOUS[operation]
            try:
                response = handler(service, live, session_id, request_type.model_validate_json(text))
            except Exception as exc:
                service.mark_failed(future_id, exc, live.core.step)
                return
            with service.db() as db:
                result = service.seal_result(db, future_id, tenant_id, response.model_dump(mode="json"))
                db.execute(update(FutureRow).where(FutureRow.id == future_id).values(status="completed", result=result))
        finally:
            live.pending -= 1
            with service.db() as db:
                db.execute(delete(WorkItem).where(WorkItem.future_id == future_id))
