"""The plugin module named by the ``tensafe`` entry point.

It imports only :mod:`tensafe`; the backend module is imported by the factory.
"""

from __future__ import annotations

from tensafe import hookimpl
from tensafe.hookspecs import Register


@hookimpl
def tensafe_register_ml_backends(register: Register) -> None:
    """Register the ``bigram`` ML backend."""

    def factory() -> object:
        from tensafe_bigram.backend import BigramBackend

        return BigramBackend()

    register("bigram", factory)
