"""A deliberately simple accountant for testing the orchestrator's budget logic.

It charges a fixed epsilon per step (``q / sigma``), which makes the step at
which a budget is crossed easy to compute by hand. It is not a DP accountant.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tensafe import hookimpl
from tensafe.hookspecs import Register
from tensafe.interfaces import PrivacyAccountant


class LinearTestAccountant(PrivacyAccountant):
    def __init__(self) -> None:
        self._epsilon = 0.0
        self._steps = 0

    def compose_step(self, sampling_rate: float, noise_multiplier: float, count: int = 1) -> None:
        self._epsilon += count * sampling_rate / noise_multiplier
        self._steps += count

    def get_epsilon(self, delta: float) -> float:
        return self._epsilon

    def get_delta(self, epsilon: float) -> float:
        return 0.0 if epsilon >= self._epsilon else 1.0

    @property
    def steps(self) -> int:
        return self._steps

    def calibrate_noise_multiplier(
        self, target_epsilon: float, delta: float, sampling_rate: float, steps: int
    ) -> float:
        return steps * sampling_rate / target_epsilon

    def state(self) -> dict[str, Any]:
        return {"epsilon": self._epsilon, "steps": self._steps}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self._epsilon = float(state["epsilon"])
        self._steps = int(state["steps"])


class LinearAccountantPlugin:
    @hookimpl
    def tensafe_register_accountants(self, register: Register) -> None:
        register("linear-test", LinearTestAccountant)
