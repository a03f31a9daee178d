"""What happens to accepted work when the process that ran it is gone.

A session's committed state survives anything; what lived only in a dead
process's memory does not: operations queued or running there, and the
gradients that forward_backward calls accumulated after the session's last
committed step. That work is reported failed and retryable, never silently
redone, and never charged: the privacy spend is the one committed with the
state.

- :func:`recover`, at ``tensafe serve`` start, covers sessions that no live
  replica holds (on SQLite, one replica per data directory, that is all of
  them): it never touches a session another replica is running.
- :func:`recover_session`, when a replica takes a session over from one
  whose lease expired, covers that session alone. Work another replica
  handed over and nobody took yet (``work_items``) stays queued: the new
  holder runs it.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, delete, or_, select, update
from sqlalchemy.orm import Session

from tensafe.api import ErrorInfo
from tensafe.server.crypto import sign_meta
from tensafe.server.db import ArtifactRow, FutureRow, SessionLease, SessionRow, Tenant, WorkItem
from tensafe.server.tenant_keys import clear_scratch

if TYPE_CHECKING:
    from tensafe.server.service import SessionService

LOST = ErrorInfo(
    error="server_restarted", message="the server restarted before this operation finished", retryable=True
)
GONE = ErrorInfo(
    error="gradients_lost",
    message="the server restarted before the optimizer step that would have used these gradients",
    retryable=True,
)


def _fail_unfinished(db: Session, sessions: Any) -> int:
    """Fail the unfinished work of ``sessions`` (a select of session ids), except work nobody took yet."""
    waiting = select(WorkItem.future_id).where(WorkItem.taken_by.is_(None))
    unfinished = list(
        db.execute(
            select(FutureRow.id).where(
                FutureRow.status.in_(("queued", "running")),
                FutureRow.session_id.in_(sessions),
                FutureRow.id.not_in(waiting),
            )
        ).scalars()
    )
    if unfinished:
        db.execute(
            update(FutureRow).where(FutureRow.id.in_(unfinished)).values(status="failed", error=LOST.model_dump_json())
        )
        db.execute(delete(WorkItem).where(WorkItem.future_id.in_(unfinished)))
    stale = list(
        db.execute(
            select(FutureRow.id)
            .join(SessionRow, SessionRow.id == FutureRow.session_id)
            .where(
                FutureRow.session_id.in_(sessions),
                FutureRow.operation == "forward_backward",
                FutureRow.status == "completed",
                FutureRow.after_step >= SessionRow.step,
            )
        ).scalars()
    )
    if stale:
        db.execute(
            update(FutureRow).where(FutureRow.id.in_(stale)).values(status="failed", error=GONE.model_dump_json())
        )
    return len(unfinished) + len(stale)


def recover_session(service: SessionService, db: Session, session_id: str) -> int:
    """A session this replica just took over: fail what its previous holder had in hand."""
    return _fail_unfinished(db, select(SessionRow.id).where(SessionRow.id == session_id))


def recover(service: SessionService) -> int:
    """Report work that a previous process accepted but never finished as failed and retryable.

    On SQLite (one server per data directory) every lease left behind is a
    dead process's, so all of them are released. On a shared database only
    sessions whose lease expired, or that never had one, are covered.

    A data directory without an audit head file (new, or from before there
    was one) gets one holding the database's heads as they are now, and
    the records an earlier version kept in the clear are taken as they
    are: metadata signed, results sealed (see :func:`adopt_legacy_records`).
    Returns how many futures were marked.
    """
    clear_scratch(service.scratch)
    first_start = not service.heads.exists()
    with service.db() as db:
        if not service.store.shared_database:
            db.execute(delete(SessionLease))
        held = select(SessionLease.session_id).where(SessionLease.expires > time.time())
        orphaned = select(SessionRow.id).where(SessionRow.id.not_in(held))
        marked = _fail_unfinished(db, orphaned)
        db.execute(
            delete(WorkItem).where(
                or_(
                    WorkItem.future_id.in_(select(FutureRow.id).where(FutureRow.status.in_(("completed", "failed")))),
                    and_(WorkItem.taken_by.is_not(None), WorkItem.session_id.in_(orphaned)),
                )
            )
        )
        if first_start:
            adopt_legacy_records(service, db)
    if first_start:
        with service.db() as db:
            tenants = db.execute(select(Tenant.id, Tenant.audit_seq, Tenant.audit_head)).all()
        service.heads.advance({tid: (seq, head) for tid, seq, head in tenants if seq})
    return marked


def adopt_legacy_records(service: SessionService, db: Session) -> None:
    """Sign metadata and seal results written in the clear by a version before these protections."""

    def legacy(stored: str) -> dict[str, Any] | None:
        value = json.loads(stored) if stored else None
        return value if isinstance(value, dict) and set(value) != {"meta", "mac"} else None

    meta_key = service.keyring.meta_key
    for row in db.execute(select(SessionRow).where(SessionRow.state_artifact.is_not(None))).scalars():
        meta = legacy(row.meta)
        if meta is not None:
            row.meta = sign_meta(meta_key, f"{row.tenant_id}/{row.state_artifact}", meta)
    for artifact in db.execute(select(ArtifactRow)).scalars():
        meta = legacy(artifact.meta)
        if meta is not None:
            artifact.meta = sign_meta(meta_key, f"{artifact.tenant_id}/{artifact.id}", meta)
    for future in db.execute(select(FutureRow).where(FutureRow.result.like("{%"))).scalars():
        assert future.result is not None
        future.result = service.seal_result(db, future.id, future.tenant_id, json.loads(future.result))
