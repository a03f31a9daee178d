"""Accountants that under-state DP-SGD's privacy loss, for the suite's reference checks to catch.

Both subclass tensafe-privacy's RDP accountant and are registered by
``NonPrivateAccountants``; tests/privacy/test_accountant_conformance_catches.py
runs the conformance checks against them.
"""

from __future__ import annotations

from tensafe import hookimpl
from tensafe.hookspecs import Register
from tensafe_privacy.accountants import RdpAccountant


class TenthEpsilonAccountant(RdpAccountant):
    """Reports a tenth of the epsilon, consistently: its delta and its calibration agree with the tenth.

    It passes every check that compares the accountant only with itself.
    """

    def get_epsilon(self, delta: float) -> float:
        return super().get_epsilon(delta) / 10

    def get_delta(self, epsilon: float) -> float:
        return super().get_delta(epsilon * 10)

    def calibrate_noise_multiplier(
        self, target_epsilon: float, delta: float, sampling_rate: float, steps: int
    ) -> float:
        return super().calibrate_noise_multiplier(target_epsilon * 10, delta, sampling_rate, steps)


class UnderCalibratingAccountant(RdpAccountant):
    """Accounts honestly but calibrates 70 % of the noise its target needs."""

    def calibrate_noise_multiplier(
        self, target_epsilon: float, delta: float, sampling_rate: float, steps: int
    ) -> float:
        return 0.7 * super().calibrate_noise_multiplier(target_epsilon, delta, sampling_rate, steps)


VARIANTS: dict[str, type[RdpAccountant]] = {
    "rdp-tenth-epsilon": TenthEpsilonAccountant,
    "rdp-under-calibrating": UnderCalibratingAccountant,
}


class NonPrivateAccountants:
    """Registers every variant in ``VARIANTS`` as an accountant."""

    @hookimpl
    def tensafe_register_accountants(self, register: Register) -> None:
        for name, cls in VARIANTS.items():
            register(name, cls)
