"""Plugin objects that observe or veto an orchestrator's work, as an embedder would."""

from __future__ import annotations

from typing import Any

from tensafe import hookimpl


class RunObserver:
    """Records every lifecycle hook call in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    @hookimpl
    def tensafe_start_run(self, run_id: str, config: Any) -> None:
        self.calls.append(("start", run_id))

    @hookimpl
    def tensafe_approve_step(self, step: int, batch_size: int) -> None:
        self.calls.append(("approve", step))

    @hookimpl
    def tensafe_report_step(self, run_id: str, step: int, metrics: dict[str, float]) -> None:
        self.calls.append(("report", (step, dict(metrics))))

    @hookimpl
    def tensafe_warn_budget(self, epsilon: float, target_epsilon: float) -> None:
        self.calls.append(("warn", (epsilon, target_epsilon)))

    @hookimpl
    def tensafe_finish_run(self, run_id: str, report: dict[str, Any]) -> None:
        self.calls.append(("finish", report["status"]))

    @hookimpl
    def tensafe_record_audit(self, event: Any) -> None:
        self.calls.append(("audit", event.operation))

    def named(self, name: str) -> list[Any]:
        return [payload for kind, payload in self.calls if kind == name]


class StepVetoer:
    """Refuses every step from ``first_refused`` on."""

    def __init__(self, first_refused: int, reason: str = "maintenance window") -> None:
        self.first_refused = first_refused
        self.reason = reason

    @hookimpl
    def tensafe_approve_step(self, step: int) -> str | None:
        return self.reason if step >= self.first_refused else None
