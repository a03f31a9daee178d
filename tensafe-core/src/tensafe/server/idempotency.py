"""Idempotent session creation: a create request retried with its ``Idempotency-Key`` returns the first session.

A slow model load can outlast a client's timeout; the SDK then retries with
the same key. The key is claimed in the database before the session is made
(so a retry reaching another replica sees the claim too): a retry that finds
the claim settled gets the session made for it, one that finds it still
being worked on waits up to :data:`WAIT_S` and then answers 429 with
``Retry-After``. A failed creation releases its claim, and a claim left by a
process that died is taken over after :data:`STALE_S`. A key reused for a
different request is refused.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from sqlalchemy import Float, ForeignKey, String, delete, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, mapped_column
from starlette.concurrency import run_in_threadpool

from tensafe.errors import UsageError
from tensafe.server.db import Base
from tensafe.server.quotas import RetryLater

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from sqlalchemy.orm import Session

    from tensafe.api import SessionInfo

#: How long a retry waits, on the server, for the creation its key already started.
WAIT_S = 20.0
#: A claim older than this whose session never appeared belongs to a process that died.
STALE_S = 600.0
RETRY_AFTER_S = 2


class IdempotentCreation(Base):
    """A create request's key, and the session made for it (None while it is being made)."""

    __tablename__ = "idempotent_creations"
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    session_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    claimed: Mapped[float] = mapped_column(Float)


class _Pending:
    """Another request holds the key's claim."""


_PENDING = _Pending()


class Creations:
    """Runs create requests at most once per (tenant, key)."""

    def __init__(self, db: Callable[[], AbstractContextManager[Session]]) -> None:
        self.db = db

    async def create(
        self,
        tenant_id: str,
        key: str | None,
        request: str,
        make: Callable[[], SessionInfo],
        existing: Callable[[str], SessionInfo],
    ) -> SessionInfo:
        """``make()`` once for ``key``; a repeated key gets ``existing(session_id)`` of the first session.

        ``request`` identifies the request (its path and body): the same key with another request is refused.
        """
        if key is None:
            return await run_in_threadpool(make)
        digest = hashlib.sha256(request.encode()).hexdigest()
        deadline = time.monotonic() + WAIT_S
        while True:
            claim = await run_in_threadpool(self._claim, tenant_id, key, digest)
            if isinstance(claim, str):
                return await run_in_threadpool(existing, claim)
            if claim is None:
                break
            if time.monotonic() > deadline:
                raise RetryLater(
                    "a request with this Idempotency-Key is still creating its session; retry with the same key",
                    code="creation_in_progress",
                    retry_after=RETRY_AFTER_S,
                )
            await asyncio.sleep(0.2)
        try:
            info = await run_in_threadpool(make)
        except BaseException:
            await run_in_threadpool(self._release, tenant_id, key)
            raise
        await run_in_threadpool(self._settle, tenant_id, key, info.session_id)
        return info

    def _claim(self, tenant_id: str, key: str, digest: str) -> str | _Pending | None:
        """None when this request now holds the claim; the session id when settled; else pending."""
        now = time.time()
        try:
            with self.db() as db:
                row = db.get(IdempotentCreation, (tenant_id, key))
                if row is None:
                    db.add(IdempotentCreation(tenant_id=tenant_id, key=key, request_hash=digest, claimed=now))
                    db.flush()
                    return None
                if row.request_hash != digest:
                    raise UsageError("this Idempotency-Key was used for a different request; use a new key")
                if row.session_id is not None:
                    return row.session_id
                if row.claimed > now - STALE_S:
                    return _PENDING
                taken = db.execute(
                    update(IdempotentCreation)
                    .where(
                        IdempotentCreation.tenant_id == tenant_id,
                        IdempotentCreation.key == key,
                        IdempotentCreation.claimed == row.claimed,
                    )
                    .values(claimed=now)
                )
                return None if taken.rowcount == 1 else _PENDING  # type: ignore[attr-defined]
        except IntegrityError:  # another request inserted the claim first
            return _PENDING

    def _settle(self, tenant_id: str, key: str, session_id: str) -> None:
        with self.db() as db:
            db.execute(
                update(IdempotentCreation)
                .where(IdempotentCreation.tenant_id == tenant_id, IdempotentCreation.key == key)
                .values(session_id=session_id)
            )

    def _release(self, tenant_id: str, key: str) -> None:
        with self.db() as db:
            db.execute(
                delete(IdempotentCreation).where(
                    IdempotentCreation.tenant_id == tenant_id, IdempotentCreation.key == key
                )
            )
