"""The TenSafe SDK: ``TenSafeClient``, ``TrainingSession``, ``InferenceSession``.

In-process (``TenSafeClient()``) it needs only the backends; against a server
(``TenSafeClient(base_url, api_key)``) it needs httpx
(``python -m pip install './tensafe-core[client]'``), imported only then.
"""

from __future__ import annotations

from tensafe.sdk.client import InferenceSession, TenSafeClient, TrainingSession
from tensafe.sdk.errors import (
    InvalidRequest,
    NotFound,
    OperationFailed,
    PrivacyBudgetExceeded,
    StepVetoed,
    TensafeError,
    Unauthorized,
)
from tensafe.sdk.futures import APIFuture

__all__ = [
    "APIFuture",
    "InferenceSession",
    "InvalidRequest",
    "NotFound",
    "OperationFailed",
    "PrivacyBudgetExceeded",
    "StepVetoed",
    "TenSafeClient",
    "TensafeError",
    "TrainingSession",
    "Unauthorized",
]
