"""Operations a tenant queues on a training session: their future rows and what their audit records cover.

``forward_backward``, ``optim_step`` and ``train_step`` are queued and polled as
futures (:mod:`tensafe.session_manager` runs them); :func:`_audited` says what a
queued operation's audit record covers (under DP no statistic of the caller's batch).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from typing import Any

from tensafe.api import ErrorInfo, ForwardBackwardRequest
from tensafe.errors import TensafeError
from tensafe.server.db import FutureRow
from tensafe.session_manager import QUEUED_REQUESTS, Queued
from tensafe.sessions import TrainingSessionCore

__all__ = ["AUDIT_SEQ_MAX", "QUEUED_REQUESTS", "Queued", "new_future"]


def _new_id() -> str:
    return uuid.uuid4().hex


def new_future(tenant_id: str, session_id: str, operation: str, request_key: str | None = None) -> FutureRow:
    """The row of a newly accepted operation, queued."""
    return FutureRow(
        id=_new_id(),
        tenant_id=tenant_id,
        session_id=session_id,
        request_key=request_key,
        operation=operation,
        status="queued",
        created=time.time(),
    )


def _audited(
    core: TrainingSessionCore, request: Queued, result: dict[str, Any], key: bytes
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The request and result a queued operation's audit record covers.

    Without DP, the operation as it ran. Under DP no loss, logprob or batch
    size: a step's result is its step number (epsilon has its own field), and
    the caller's batch appears only as an HMAC under the audit key: the key
    holder can tell whether a given batch is the one recorded, nobody else can.
    """
    if core.privacy is None:
        return request.model_dump(mode="json"), result
    if not isinstance(request, ForwardBackwardRequest):
        return request.model_dump(mode="json"), {"step": core.step}
    canonical = json.dumps(
        [d.model_dump(mode="json") for d in request.data], sort_keys=True, separators=(",", ":")
    ).encode()
    keyed = hmac.new(key, b"tensafe audit: batch\x00" + canonical, hashlib.sha256).hexdigest()
    return {"data_hmac": keyed, "loss_fn": request.loss_fn, "loss_fn_config": request.loss_fn_config}, {}


def _error(exc: BaseException) -> ErrorInfo:
    if isinstance(exc, TensafeError):
        data = exc.to_dict()
        retryable = bool(data.pop("retryable", False))
        return ErrorInfo(error=data.pop("error"), message=data.pop("message"), retryable=retryable, details=data)
    return ErrorInfo(error="internal_error", message=f"{type(exc).__name__}: {exc}", retryable=False)


#: Largest audit sequence number the database column holds (a 32-bit integer).
AUDIT_SEQ_MAX = 2**31 - 1
