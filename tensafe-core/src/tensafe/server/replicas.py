"""Several ``tensafe serve`` replicas on one database: which replica runs which training session.

A training session lives in the memory of one replica at a time: the one
holding its lease (a row of ``session_leases``). The holder renews the lease
while it runs; if the replica dies, the lease expires and the next replica
that needs the session takes it over, incrementing the lease's fencing token,
and rebuilds the session from its last committed state. Every commit of a
session's state checks, under a row lock, that the committing replica still
holds the lease with the token it loaded the session under, and that the
stored step is the one it last committed: a replica that lost its lease
(paused, partitioned) cannot overwrite its successor's steps or privacy spend.

A request for a session another live replica holds is not refused: the
receiving replica writes it to ``work_items`` (sealed under the tenant's key)
and the holder's dispatcher takes it, in order, and runs it; the result comes
back through the future's row. Inference sessions hold nothing that changes,
so every replica serves them from its own copy.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from tensafe.errors import OperationFailed
from tensafe.server.db import SessionLease

#: How long a lease lasts without renewal; a dead replica's sessions move after this.
LEASE_SECONDS = 10.0
#: How often a replica looks for work other replicas handed it (and renews leases, every third of a lease).
POLL_SECONDS = 0.025


class LeaseLost(OperationFailed):
    """This replica no longer holds the session's lease: another replica took it over."""

    def __init__(self, session_id: str) -> None:
        super().__init__(
            f"session {session_id} moved to another replica before this operation committed; submit it again",
            code="session_moved",
            retryable=True,
        )


@dataclass(frozen=True)
class Grant:
    """A lease this replica holds: its fencing token, and whether it was just taken from another holder."""

    token: int
    taken_over: bool


class Leases:
    """This replica's leases, as the database grants them."""

    def __init__(self, lease_seconds: float = LEASE_SECONDS, *, exclusive: bool = False) -> None:
        self.replica = uuid.uuid4().hex
        self.lease_seconds = lease_seconds
        #: One server per database (SQLite in its data directory): another owner can only be a dead process.
        self.exclusive = exclusive
        self._held: dict[str, tuple[int, float]] = {}
        self._lock = threading.Lock()

    def token(self, session_id: str) -> int | None:
        """The token of a lease held with time to spare (None: ask the database)."""
        with self._lock:
            held = self._held.get(session_id)
        if held is None or held[1] - time.time() < self.lease_seconds / 3:
            return None
        return held[0]

    def acquire(self, db: Session, session_id: str) -> Grant | None:
        """Hold (or renew) the session's lease; None while another live replica holds it."""
        now = time.time()
        row = db.execute(
            select(SessionLease).where(SessionLease.session_id == session_id).with_for_update()
        ).scalar_one_or_none()
        taken_over = False
        if row is None:
            row = SessionLease(session_id=session_id, owner=self.replica, token=1, expires=now + self.lease_seconds)
            db.add(row)
        elif row.owner != self.replica:
            if row.expires > now and not self.exclusive:
                return None
            row.owner, row.token, taken_over = self.replica, row.token + 1, True
        row.expires = now + self.lease_seconds
        db.flush()
        with self._lock:
            mine = self._held.get(session_id)
            if mine is not None and mine[0] != row.token:
                taken_over = True  # it lapsed and was taken (and perhaps lost) while this replica held it
            self._held[session_id] = (row.token, row.expires)
        return Grant(row.token, taken_over)

    def check(self, db: Session, session_id: str, token: int) -> None:
        """Inside a commit: the lease is still this replica's under ``token`` (locked until the commit)."""
        row = db.execute(
            select(SessionLease).where(SessionLease.session_id == session_id).with_for_update()
        ).scalar_one_or_none()
        if row is None or row.owner != self.replica or row.token != token:
            self.forget(session_id)
            raise LeaseLost(session_id)

    def renew(self, db: Session) -> list[str]:
        """Extend every lease this replica holds; returns the sessions whose lease it lost."""
        with self._lock:
            held = dict(self._held)
        lost = []
        now = time.time()
        for session_id, (token, _) in held.items():
            row = db.execute(
                select(SessionLease).where(SessionLease.session_id == session_id).with_for_update()
            ).scalar_one_or_none()
            if row is None or row.owner != self.replica or row.token != token:
                lost.append(session_id)
                continue
            row.expires = now + self.lease_seconds
            with self._lock:
                if self._held.get(session_id, (None,))[0] == token:
                    self._held[session_id] = (token, row.expires)
        for session_id in lost:
            self.forget(session_id)
        return lost

    def release(self, db: Session) -> None:
        """Give up every lease this replica holds (a clean shutdown): another replica may take them at once."""
        held = self.held()
        if held:
            db.execute(
                update(SessionLease)
                .where(SessionLease.owner == self.replica, SessionLease.session_id.in_(held))
                .values(expires=0.0)
            )
        with self._lock:
            self._held.clear()

    def forget(self, session_id: str) -> None:
        with self._lock:
            self._held.pop(session_id, None)

    def held(self) -> list[str]:
        with self._lock:
            return list(self._held)
