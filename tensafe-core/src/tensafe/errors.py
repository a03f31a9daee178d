"""The TenSafe exception tree.

Every error TenSafe raises on purpose derives from :class:`TensafeError`. Each
carries an ``exit_code`` that the CLI uses, so a user mistake ends with a
message and a non-zero status, never a traceback. ``2`` means "the request was
wrong or cannot be served by what is installed"; ``1`` means "the work itself
failed".
"""

from __future__ import annotations

from typing import Any


class TensafeError(Exception):
    """Root of every error TenSafe raises on purpose."""

    exit_code: int = 1
    code: str = "tensafe_error"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description, used by ``--json`` output and the HTTP API."""
        return {"error": self.code, "message": str(self)}


class UsageError(TensafeError):
    """The caller asked for something malformed or impossible."""

    exit_code = 2
    code = "invalid_request"


class ConfigError(UsageError):
    """A configuration file or value is invalid.

    ``problems`` holds one ``(field path, message)`` pair per invalid field.
    """

    code = "invalid_config"

    def __init__(self, message: str, problems: list[tuple[str, str]] | None = None) -> None:
        self.problems = list(problems or [])
        lines = [message] + [f"  {loc}: {msg}" for loc, msg in self.problems]
        super().__init__("\n".join(lines))


class PluginError(TensafeError):
    """Base for problems with plugins and the objects they register."""

    exit_code = 2
    code = "plugin_error"


class PluginLoadError(PluginError):
    """A plugin failed to load while strict plugin loading was on."""

    code = "plugin_load_failed"


class DuplicateRegistrationError(PluginError):
    """Two plugins registered the same name for the same kind of object."""

    code = "duplicate_registration"


class NotInstalledError(PluginError):
    """A name was looked up that no installed plugin provides."""

    code = "not_installed"

    def __init__(self, message: str, *, kind: str, name: str, available: list[str], install: str | None) -> None:
        super().__init__(message)
        self.kind = kind
        self.name = name
        self.available = available
        self.install = install

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data.update(kind=self.kind, name=self.name, available=self.available, install=self.install)
        return data


class InterfaceError(PluginError):
    """A plugin registered an object that does not implement its interface."""

    code = "interface_mismatch"


class PluginFactoryError(PluginError):
    """A registered factory raised (a lazy import that is missing, a constructor that fails)."""

    code = "plugin_factory_failed"


class MissingDependencyError(TensafeError):
    """An optional dependency needed for the requested feature is not installed."""

    exit_code = 2
    code = "missing_dependency"


class BackendError(TensafeError):
    """A backend could not do what it was asked (bad batch, unknown loss, ...)."""

    exit_code = 2
    code = "backend_error"


class StepVetoed(TensafeError):
    """A lifecycle hook refused a training step before it ran."""

    code = "step_vetoed"

    def __init__(self, step: int, reasons: list[str]) -> None:
        self.step = step
        self.reasons = reasons
        super().__init__(f"training step {step} was refused: " + "; ".join(reasons))


class PrivacyBudgetExceeded(TensafeError):
    """A step was refused because it would take the run past its privacy budget.

    The step never ran: no gradient was applied and no privacy was spent.
    """

    exit_code = 3
    code = "privacy_budget_exceeded"

    def __init__(self, *, epsilon: float, delta: float, steps: int, target_epsilon: float, would_be: float) -> None:
        self.epsilon = epsilon
        self.delta = delta
        self.steps = steps
        self.target_epsilon = target_epsilon
        self.would_be = would_be
        super().__init__(
            f"privacy budget reached: step {steps + 1} would raise epsilon to {would_be:.4f} "
            f"(> target {target_epsilon:g}); spent epsilon {epsilon:.4f} at delta {delta:.3g} in {steps} steps"
        )

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data.update(
            epsilon=self.epsilon,
            delta=self.delta,
            steps=self.steps,
            target_epsilon=self.target_epsilon,
            would_be=self.would_be,
        )
        return data


class NotFound(UsageError):
    """The session, future or artifact does not exist (or belongs to someone else: the two look alike)."""

    code = "not_found"


class Unauthorized(TensafeError):
    """The request carries no API key, or one that is unknown or revoked."""

    exit_code = 2
    code = "unauthorized"


class PayloadTooLarge(UsageError):
    """The request body is larger than the server accepts."""

    code = "payload_too_large"


class OperationFailed(TensafeError):
    """Queued work did not finish; ``retryable`` says whether submitting it again is safe and useful."""

    code = "operation_failed"

    def __init__(self, message: str, *, code: str | None = None, retryable: bool = False) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.retryable = retryable

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["retryable"] = self.retryable
        return data


class WorkersLost(TensafeError):
    """A distributed run lost a worker (it died, hung past the collective timeout, or was stopped by the
    launcher); the run stops with its last checkpoint intact and resumes at any world size."""

    code = "workers_lost"
