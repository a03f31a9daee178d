"""Operations a tenant queues on a training session, and a session as loaded in one replica.

``forward_backward``, ``optim_step`` and ``train_step`` are queued and polled as
futures; :func:`_audited` says what a queued operation's audit record covers
(under DP no statistic of the caller's batch).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from tensafe.api import ErrorInfo, ForwardBackwardRequest, OptimStepRequest, TrainStepRequest
from tensafe.errors import TensafeError
from tensafe.sessions import TrainingSessionCore


def _new_id() -> str:
    return uuid.uuid4().hex


Queued = ForwardBackwardRequest | OptimStepRequest | TrainStepRequest
#: The operations a tenant queues and polls as futures, by name.
QUEUED_REQUESTS: dict[str, type[Queued]] = {
    "forward_backward": ForwardBackwardRequest,
    "optim_step": OptimStepRequest,
    "train_step": TrainStepRequest,
}


def _operation(request: Queued) -> str:
    if isinstance(request, ForwardBackwardRequest):
        return "forward_backward"
    return "optim_step" if isinstance(request, OptimStepRequest) else "train_step"


def _execute(core: TrainingSessionCore, request: Queued) -> dict[str, Any]:
    """Run a queued operation on its session; the result as the caller gets it."""
    if isinstance(request, ForwardBackwardRequest):
        return core.forward_backward(request.data, request.loss_fn, request.loss_fn_config).model_dump()
    if isinstance(request, OptimStepRequest):
        return core.optim_step(request.adam_params).model_dump()
    return core.train_step(request.adam_params).model_dump()


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


@dataclass
class _Live:
    """A session loaded in this process, with the worker that runs its operations in order."""

    tenant_id: str
    kind: str
    core: Any
    worker: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(max_workers=1))
    pending: int = 0
    #: The lease token the session was loaded under (training sessions; see tensafe.server.replicas).
    token: int | None = None
    #: The step of the state last committed from this copy: a commit expects to find it stored.
    committed_step: int = 0
    #: Set when this copy was dropped: it must never commit again.
    evicted: bool = False
    #: Operations accepted but not yet handed to the worker, in submission order (see ``submit(defer=...)``).
    unstarted: list[Callable[[], Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        """Hand every accepted operation to the worker, oldest first."""
        with self.lock:
            ready, self.unstarted = self.unstarted, []
            for work in ready:
                self.worker.submit(work)
