"""Reward functions for RLVR tests, named in configs by dotted path."""

from __future__ import annotations

from typing import Any

from tensafe import hookimpl


class FlakyReward:
    """Raises on its first call and returns NaN on its second; afterwards 1.0 for every completion."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, prompt: str, completion: str, reference: str | None) -> float:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("checker crashed")
        if self.calls == 2:
            return float("nan")
        return 1.0


def constant_one(prompt: str, completion: str, reference: str | None) -> float:
    return 1.0


class ScaledReward:
    """``scale`` times a checksum of the completion in [0, 1), so rewards differ between rollouts."""

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    def __call__(self, prompt: str, completion: str, reference: str | None) -> float:
        return self.scale * (sum(completion.encode()) % 97) / 97


class AuditRecorder:
    """Keeps every audit event with its details."""

    def __init__(self) -> None:
        self.events: list[Any] = []

    @hookimpl
    def tensafe_record_audit(self, event: Any) -> None:
        self.events.append(event)
