"""The ``tensafe`` entry point of tensafe-torch; imports nothing but tensafe (torch loads in the factory)."""

from __future__ import annotations

from tensafe import hookimpl
from tensafe.hookspecs import Register


def _torch_backend() -> object:
    from tensafe_torch.backend import TorchBackend

    return TorchBackend()


@hookimpl
def tensafe_register_ml_backends(register: Register) -> None:
    register("torch", _torch_backend)
