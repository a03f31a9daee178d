"""The ``tensafe`` entry point of tensafe-tgsp; imports nothing but tensafe.

cryptography and click are imported inside the factories, when a loader or the
``tensafe tgsp`` command is actually used.
"""

from __future__ import annotations

from tensafe import hookimpl
from tensafe.hookspecs import Register


def _tgsp_loader() -> object:
    from tensafe_tgsp.loader import TGSPPackageLoader

    return TGSPPackageLoader()


@hookimpl
def tensafe_register_tgsp_loaders(register: Register) -> None:
    register("tgsp", _tgsp_loader)


@hookimpl
def tensafe_register_commands(register: Register) -> None:
    def tgsp_group() -> object:
        """Signed, encrypted adapter packages: keygen, pack, verify, inspect, unpack."""
        from tensafe_tgsp.cli import tgsp

        return tgsp

    register("tgsp", tgsp_group)
