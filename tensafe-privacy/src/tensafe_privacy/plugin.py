"""The ``tensafe`` entry point of tensafe-privacy; imports nothing but tensafe."""

from __future__ import annotations

from tensafe import hookimpl
from tensafe.hookspecs import Register


def _rdp() -> object:
    from tensafe_privacy.accountants import RdpAccountant

    return RdpAccountant()


def _pld() -> object:
    from tensafe_privacy.accountants import PldAccountant

    return PldAccountant()


@hookimpl
def tensafe_register_accountants(register: Register) -> None:
    register("rdp", _rdp)
    register("pld", _pld)
    # "prv" (Opacus' name for its tight numerical accountant) is served by the
    # PLD accountant, which computes the same tight bound; it is an alias, not
    # a separate PRV implementation.
    register("prv", _pld)


@hookimpl
def tensafe_register_commands(register: Register) -> None:
    def privacy_group() -> object:
        """Privacy accounting for DP-SGD: epsilon, noise calibration, step planning."""
        from tensafe_privacy.cli import privacy

        return privacy

    register("privacy", privacy_group)
