"""Helpers shared by the conformance mixins and the pytest plugin."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import pytest

from tensafe.plugins import PluginSettings, TensafePluginManager, create_plugin_manager

F = TypeVar("F", bound=Callable[..., Any])


def fresh_plugin_manager(*, plugins: Iterable[object] = (), autoload: bool = False) -> TensafePluginManager:
    """A new plugin manager, strict, with entry points loaded only when ``autoload``."""
    return create_plugin_manager(plugins=plugins, settings=PluginSettings(autoload=autoload, strict=True))


def requires_capability(capability: str) -> Callable[[F], F]:
    """Mark a conformance test as applying only to objects that declare ``capability``.

    The mixin's ``subject`` fixture skips such a test for objects that do not
    declare it: an undeclared optional feature is not a failure.
    """

    def mark(func: F) -> F:
        marked: F = pytest.mark.tensafe_capability(capability)(func)
        return marked

    return mark


def skip_unless_capable(request: pytest.FixtureRequest, obj: object) -> None:
    """Skip the requesting test when ``obj`` lacks a capability the test requires."""
    from tensafe.capabilities import has

    for marker in request.node.iter_markers("tensafe_capability"):
        capability = marker.args[0]
        if not has(obj, capability):
            pytest.skip(f"{type(obj).__name__} does not declare capability {capability!r}")
