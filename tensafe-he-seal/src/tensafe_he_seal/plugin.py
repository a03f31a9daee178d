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


@hookimpl
def tensafe_register_commands(register: Register) -> None:
    def he_group() -> object:
        """HE-encrypted adapters: package one for an evaluator, seal the key owner's state."""
        from tensafe_he_seal.cli import he

        return he

    register("he", he_group)
