"""Per-tenant quotas: how many sessions, how much queued work and how many uploaded bytes a tenant may hold.

``tensafe serve --max-sessions N --max-queued N --max-upload-bytes N`` (0 means
unlimited). The API checks them before it does the work: past a quota a
request is refused with 429 ``quota_exceeded`` (with ``Retry-After`` when
waiting helps: queued work drains by itself, sessions do not), an upload
that would take the bytes of the tenant's datasets and TGSP packages
(uploaded or exported) past the quota with 413 ``payload_too_large``. The counts are read from the database, so
every replica over one database enforces the same totals; two requests
racing for the last unit may both pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import func, select

from tensafe.errors import OperationFailed, PayloadTooLarge
from tensafe.server.db import ArtifactRow, FutureRow, SessionRow

if TYPE_CHECKING:
    from collections.abc import Callable
    from contextlib import AbstractContextManager

    from sqlalchemy.orm import Session

#: Futures in these states are still to run.
UNFINISHED = ("queued", "running")
#: What the upload quota counts: the tenant's datasets, TGSP packages (uploaded or exported) and encrypted
#: HE-LoRA adapters (tensafe.server.he_sessions).
STORED_KINDS = ("dataset", "tgsp", "he-adapter")
#: How long a tenant at its queued-work quota is told to wait.
QUEUED_RETRY_AFTER_S = 2


class RetryLater(OperationFailed):
    """429: refused for now. ``retry_after`` (seconds) when waiting helps, else None (and not retryable)."""

    def __init__(self, message: str, *, code: str, retry_after: int | None) -> None:
        super().__init__(message, code=code, retryable=retry_after is not None)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Quotas:
    """The limits for each tenant; 0 is unlimited."""

    max_sessions: int = 1000
    max_queued: int = 1000
    max_upload_bytes: int = 64 * 1024**3

    def __post_init__(self) -> None:
        for name in ("max_sessions", "max_queued", "max_upload_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 (unlimited) or more")


class QuotaGuard:
    """Checks a tenant's holdings against :class:`Quotas` in the database behind ``db``."""

    def __init__(self, quotas: Quotas, db: Callable[[], AbstractContextManager[Session]]) -> None:
        self.quotas = quotas
        self.db = db

    def check_sessions(self, tenant_id: str) -> None:
        """Before a session is created: refused (not retryable) when the tenant holds its quota of sessions."""
        limit = self.quotas.max_sessions
        if limit:
            with self.db() as db:
                held = db.scalar(select(func.count()).where(SessionRow.tenant_id == tenant_id)) or 0
            if held >= limit:
                raise RetryLater(
                    f"quota exceeded: this tenant holds {held} sessions, the server's limit is {limit}",
                    code="quota_exceeded",
                    retry_after=None,
                )

    def check_queued(self, tenant_id: str) -> None:
        """Before work is queued: refused with Retry-After when the tenant has its quota of unfinished work."""
        limit = self.quotas.max_queued
        if limit:
            with self.db() as db:
                held = (
                    db.scalar(
                        select(func.count()).where(FutureRow.tenant_id == tenant_id, FutureRow.status.in_(UNFINISHED))
                    )
                    or 0
                )
            if held >= limit:
                raise RetryLater(
                    f"quota exceeded: this tenant has {held} operations queued or running, the server's limit is "
                    f"{limit}; retry once some have finished",
                    code="quota_exceeded",
                    retry_after=QUEUED_RETRY_AFTER_S,
                )

    def upload_allowance(self, tenant_id: str, cap: int) -> int:
        """How many bytes the tenant's next upload may have: ``cap``, or less to stay within its upload quota."""
        limit = self.quotas.max_upload_bytes
        if not limit:
            return cap
        with self.db() as db:
            used = (
                db.scalar(
                    select(func.coalesce(func.sum(ArtifactRow.size), 0)).where(
                        ArtifactRow.tenant_id == tenant_id, ArtifactRow.kind.in_(STORED_KINDS)
                    )
                )
                or 0
            )
        left = limit - int(used)
        if left <= 0:
            raise PayloadTooLarge(
                f"quota exceeded: this tenant's datasets and packages hold {used} bytes, the server's limit is {limit}"
            )
        return min(cap, left)
