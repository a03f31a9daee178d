"""The pytest plugin (entry point ``pytest11``) shipped with tensafe-core.

Fixtures:

``tensafe_plugin_manager``
    A fresh, strict plugin manager with entry-point autoload off.
``register_tensafe_plugin``
    ``register_tensafe_plugin(plugin)`` registers a plugin object into
    ``tensafe_plugin_manager`` for one test and unregisters it afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tensafe.plugins import TensafePluginManager


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "tensafe_capability(name): conformance test that needs an optional capability")


@pytest.fixture
def tensafe_plugin_manager() -> TensafePluginManager:
    """A fresh, strict plugin manager that loads no entry points."""
    from tensafe.testing.support import fresh_plugin_manager

    return fresh_plugin_manager()


@pytest.fixture
def register_tensafe_plugin(tensafe_plugin_manager: TensafePluginManager) -> Iterator[Callable[[object], object]]:
    """Register plugin objects into ``tensafe_plugin_manager`` for one test."""
    added: list[object] = []

    def register(plugin: object) -> object:
        tensafe_plugin_manager.register(plugin)
        tensafe_plugin_manager.check_pending()
        added.append(plugin)
        return plugin

    yield register
    for plugin in added:
        if tensafe_plugin_manager.is_registered(plugin):
            tensafe_plugin_manager.unregister(plugin)
