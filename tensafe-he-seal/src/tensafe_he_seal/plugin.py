"""The ``tensafe`` entry point of tensafe-he-seal; imports nothing but tensafe (Pyfhel loads in the factory)."""

from __future__ import annotations

from tensafe import hookimpl
from tensafe.hookspecs import Register


def _seal_ckks() -> object:
    from tensafe_he_seal.backend import SealCKKSBackend

    return SealCKKSBackend()


@hookimpl
def tensafe_register_he_backends(register: Register) -> None:
    register("seal-ckks", _seal_ckks)
