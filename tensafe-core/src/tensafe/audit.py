"""Audit events: what the orchestrator reports through ``tensafe_record_audit``."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class AuditEvent:
    """One auditable operation.

    :ivar operation: what happened, e.g. ``run.start``, ``train.step``, ``artifact.write``.
    :ivar subject: what it happened to (a run id, a file path, ...).
    :ivar details: JSON-ready facts about it (step, epsilon, file hash, ...).
    :ivar time: seconds since the epoch.
    """

    operation: str
    subject: str
    details: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
