"""The SDK's typed errors: the same classes whether the session runs in-process or on a server.

A server's JSON error (``{"error": code, "message": ..., ...}``) is turned back
into the class that raised it, so ``except PrivacyBudgetExceeded`` works alike
through both doors.
"""

from __future__ import annotations

from typing import Any

from tensafe.errors import (
    ConfigError,
    MissingDependencyError,
    NotFound,
    NotInstalledError,
    OperationFailed,
    PayloadTooLarge,
    PrivacyBudgetExceeded,
    StepVetoed,
    TensafeError,
    Unauthorized,
    UsageError,
)

#: A request the caller can fix: bad values, an impossible operation.
InvalidRequest = UsageError

__all__ = [
    "ConfigError",
    "InvalidRequest",
    "MissingDependencyError",
    "NotFound",
    "OperationFailed",
    "PayloadTooLarge",
    "PrivacyBudgetExceeded",
    "StepVetoed",
    "TensafeError",
    "Unauthorized",
    "error_from",
]

_SIMPLE: dict[str, type[TensafeError]] = {
    "not_found": NotFound,
    "unauthorized": Unauthorized,
    "payload_too_large": PayloadTooLarge,
    "invalid_config": ConfigError,
    "missing_dependency": MissingDependencyError,
}


def error_from(body: dict[str, Any], *, retryable: bool = False) -> TensafeError:
    """The exception a server's error body describes."""
    code = str(body.get("error", "operation_failed"))
    message = str(body.get("message", code))
    details = {**body, **body.get("details", {})}
    if code == "privacy_budget_exceeded":
        try:
            return PrivacyBudgetExceeded(
                epsilon=float(details["epsilon"]),
                delta=float(details["delta"]),
                steps=int(details["steps"]),
                target_epsilon=float(details["target_epsilon"]),
                would_be=float(details["would_be"]),
            )
        except (KeyError, TypeError, ValueError):
            pass
    if code == "step_vetoed":
        error: TensafeError = StepVetoed(int(details.get("step", 0)), [message])
        error.args = (message,)
        return error
    if code in _SIMPLE:
        return _SIMPLE[code](message)
    if code == "not_installed":
        return NotInstalledError(
            message,
            kind=str(details.get("kind", "")),
            name=str(details.get("name", "")),
            available=list(details.get("available", [])),
            install=details.get("install"),
        )
    if code in ("invalid_request", "malformed_json", "backend_error", "invalid_config") or code.startswith("invalid"):
        usage = UsageError(message)
        usage.code = code
        return usage
    return OperationFailed(message, code=code, retryable=bool(body.get("retryable", retryable)))
