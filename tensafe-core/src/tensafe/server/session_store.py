"""The server's session store: committed session states in the database, fenced by leases.

A training session's recovery point is its state artifact (sealed under the
tenant key), its signed metadata (step and privacy spend) and its step column.
A commit goes through only while this replica holds the session's lease under
the token it loaded the session with, and the stored step is the one this copy
last committed; otherwise it raises :class:`~tensafe.server.replicas.LeaseLost`
and the session manager evicts the copy.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from sqlalchemy import delete
from sqlalchemy.orm import Session

from tensafe.server.crypto import sign_meta
from tensafe.server.db import ArtifactRow
from tensafe.server.replicas import LeaseLost

if TYPE_CHECKING:
    from tensafe.server.service import SessionService
    from tensafe.session_manager import LoadedSession
    from tensafe.sessions import TrainingSessionCore

#: ``Session.info`` key: state artifacts a commit replaced, whose files go once the transaction committed.
_REPLACED = "tensafe.replaced_states"


class SQLSessionStore:
    """Commits of the server's training sessions (see the module docstring)."""

    def __init__(self, service: SessionService) -> None:
        self.service = service

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A database transaction; the files of state artifacts it replaced are removed after it committed."""
        replaced: list[tuple[str, str]] = []
        with self.service.db() as db:
            db.info[_REPLACED] = replaced
            yield db
        for tenant_id, artifact_id in replaced:
            self.service.store.discard_file(tenant_id, artifact_id)

    def check(self, db: Session, session_id: str, loaded: LoadedSession) -> None:
        """This copy of the session is still the one that may write."""
        if loaded.evicted:
            raise LeaseLost(session_id)
        if loaded.token is not None:
            self.service.leases.check(db, session_id, loaded.token)

    def commit(self, db: Session, session_id: str, loaded: LoadedSession, *, state_changed: bool) -> None:
        self.check(db, session_id, loaded)
        if not state_changed:
            return
        service, tenant_id = self.service, loaded.tenant_id
        row = service._row(db, tenant_id, session_id)
        if row.step != loaded.committed_step:
            service.leases.forget(session_id)
            raise LeaseLost(session_id)
        core: TrainingSessionCore = loaded.core
        state, meta = core.snapshot()
        spent = core.privacy_spent()
        meta["spent"] = spent.model_dump() if spent is not None else None
        previous = row.state_artifact
        row.state_artifact = service.store_artifact(db, tenant_id, "session", state)
        binding = f"{tenant_id}/{row.state_artifact}"
        row.step, row.meta, row.epsilon = core.step, sign_meta(service.keyring.meta_key, binding, meta), core.epsilon()
        if previous is not None:
            db.execute(delete(ArtifactRow).where(ArtifactRow.id == previous))
            service.store.delete(db, previous)
            db.info.setdefault(_REPLACED, []).append((tenant_id, previous))
        loaded.committed_step = core.step
