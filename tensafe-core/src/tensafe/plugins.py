"""Building the plugin manager: specs, built-ins, then entry points one by one.

Nothing happens at import time; :func:`create_plugin_manager` does the work.
Environment switches (each can also be passed as an argument):

``TENSAFE_LOAD_PLUGINS``
    Comma-separated allowlist of entry-point names to load (empty = none).
``TENSAFE_DISABLE_PLUGIN_AUTOLOAD``
    ``1`` loads no entry points at all (tests register plugins by hand).
``TENSAFE_STRICT_PLUGINS``
    ``1`` makes any plugin failure fatal (CI uses it): one that does not
    import, and one bad registration (see :mod:`tensafe.registry`).
``TENSAFE_TRACE_PLUGINS``
    ``1`` writes every hook call and its result to standard error.
"""

from __future__ import annotations

import os
import sys
import threading
import traceback
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pluggy

from tensafe import hookspecs
from tensafe.errors import PluginLoadError

if TYPE_CHECKING:
    from tensafe.registry import Registry

ENTRY_POINT_GROUP = "tensafe"
BUILTIN_PLUGINS = ("tensafe.builtin_plugin",)

_TRUE = {"1", "true", "yes", "on"}


def _env_flag(environ: Mapping[str, str], name: str) -> bool:
    return environ.get(name, "").strip().lower() in _TRUE


@dataclass(frozen=True)
class LoadFailure:
    """A plugin that could not be loaded, or one of whose registrations was dropped, and why.

    ``stage`` is ``"load"`` when the plugin itself failed (it did not import, or
    implements an unknown hook) and ``"register"`` when the plugin is loaded but
    one registration of it was dropped (see :mod:`tensafe.registry`).
    """

    name: str
    distribution: str | None
    version: str | None
    error: str
    traceback: str = field(repr=False, default="", compare=False)
    stage: str = "load"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "distribution": self.distribution, "version": self.version, "error": self.error}


@dataclass(frozen=True)
class PluginSettings:
    """How a plugin manager loads plugins; see the module docstring."""

    autoload: bool = True
    allowlist: frozenset[str] | None = None
    strict: bool = False
    trace: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> PluginSettings:
        environ = os.environ if environ is None else environ
        raw = environ.get("TENSAFE_LOAD_PLUGINS")
        allowlist = None if raw is None else frozenset(n.strip() for n in raw.split(",") if n.strip())
        return cls(
            autoload=not _env_flag(environ, "TENSAFE_DISABLE_PLUGIN_AUTOLOAD"),
            allowlist=allowlist,
            strict=_env_flag(environ, "TENSAFE_STRICT_PLUGINS"),
            trace=_env_flag(environ, "TENSAFE_TRACE_PLUGINS"),
        )


class TensafePluginManager(pluggy.PluginManager):
    """A pluggy plugin manager that remembers which plugins failed to load."""

    def __init__(self, settings: PluginSettings) -> None:
        super().__init__(hookspecs.PROJECT_NAME)
        self.settings = settings
        self.load_failures: list[LoadFailure] = []
        self.builtin_names: set[str] = set()
        self._distributions: dict[str, tuple[str, str]] = {}
        self._registry: Registry | None = None
        self._stdout_routed = False

    @property
    def registry(self) -> Registry:
        """The :class:`tensafe.registry.Registry` over this manager, built on first use."""
        if self._registry is None:
            from tensafe.registry import Registry

            self._registry = Registry(self)
        return self._registry

    def register(self, plugin: object, name: str | None = None) -> str | None:
        # Registrations are collected lazily; any change of plugins invalidates them.
        self._registry = None
        return super().register(plugin, name)

    def unregister(self, plugin: object | None = None, name: str | None = None) -> Any:
        self._registry = None
        return super().unregister(plugin, name)

    def distribution_of(self, plugin_name: str) -> tuple[str | None, str | None]:
        """``(distribution name, version)`` that provided a plugin; core for built-ins."""
        if plugin_name in self.builtin_names:
            from tensafe import __version__

            return "tensafe-core", __version__
        return self._distributions.get(plugin_name, (None, None))

    def describe(self, plugin_name: str) -> str:
        """``plugin 'x' (tensafe-x 1.0)``: a plugin as error messages name it."""
        distribution, version = self.distribution_of(plugin_name)
        where = f" ({distribution} {version})" if distribution else ""
        return f"plugin {plugin_name!r}{where}"

    def record_registration_failure(self, plugin_name: str, error: str) -> None:
        """Record that a registration of ``plugin_name`` was dropped (once, however often the registry is rebuilt)."""
        distribution, version = self.distribution_of(plugin_name)
        failure = LoadFailure(plugin_name, distribution, version, error, stage="register")
        if failure not in self.load_failures:
            self.load_failures.append(failure)

    def route_hook_output_to_stderr(self) -> None:
        """From now on, whatever a hook implementation writes to ``sys.stdout`` goes to ``sys.stderr``.

        The CLI turns this on so that a plugin that prints cannot corrupt
        ``--json`` output. Calls may nest and may run in several threads: stdout
        is swapped when the first hook call starts and restored when the last ends.
        """
        if self._stdout_routed:
            return
        self._stdout_routed = True
        lock = threading.Lock()
        depth = 0
        saved: Any = None

        def before(hook_name: str, hook_impls: object, kwargs: object) -> None:
            nonlocal depth, saved
            with lock:
                if depth == 0:
                    saved, sys.stdout = sys.stdout, sys.stderr
                depth += 1

        def after(outcome: object, hook_name: str, hook_impls: object, kwargs: object) -> None:
            nonlocal depth, saved
            with lock:
                depth -= 1
                if depth == 0:
                    sys.stdout, saved = saved, None

        self.add_hookcall_monitoring(before, after)

    def _record(self, name: str, exc: BaseException) -> None:
        distribution, version = self._distributions.get(name, (None, None))
        failure = LoadFailure(
            name=name,
            distribution=distribution,
            version=version,
            error=f"{type(exc).__name__}: {exc}",
            traceback="".join(traceback.format_exception(exc)),
        )
        self.load_failures.append(failure)
        if self.settings.strict:
            where = f" (from {failure.distribution} {failure.version})" if failure.distribution else ""
            raise PluginLoadError(f"plugin {name!r}{where} failed to load: {failure.error}") from exc

    def load_entry_points(self) -> None:
        """Load the ``tensafe`` entry points one at a time, recording failures."""
        import importlib_metadata

        allow = self.settings.allowlist
        for ep in sorted(importlib_metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            if allow is not None and ep.name not in allow:
                continue
            if self.get_plugin(ep.name) is not None or self.is_blocked(ep.name):
                continue
            if ep.dist is not None:
                self._distributions[ep.name] = (ep.dist.metadata["name"], ep.dist.version)
            try:
                self.register(ep.load(), name=ep.name)
            except Exception as exc:  # any error inside third-party code is recorded, never fatal unless strict
                self._record(ep.name, exc)

    def check_pending_plugins(self) -> None:
        """Like ``check_pending`` but drops (and records) each plugin with unknown hooks."""
        while True:
            try:
                self.check_pending()
                return
            except pluggy.PluginValidationError as exc:
                name = self.get_name(exc.plugin) or repr(exc.plugin)
                self.unregister(exc.plugin)
                self._record(name, exc)


def create_plugin_manager(
    *,
    plugins: Iterable[object] = (),
    settings: PluginSettings | None = None,
    environ: Mapping[str, str] | None = None,
) -> TensafePluginManager:
    """Build a plugin manager: specs, built-ins, ``plugins``, then entry points.

    :param plugins: extra plugin objects (modules or instances with
        ``@hookimpl`` methods) to register before entry points are loaded.
    :param settings: loading switches; default read from ``environ``.
    :param environ: where to read settings from; default ``os.environ``.
    """
    import importlib

    settings = settings if settings is not None else PluginSettings.from_env(environ)
    pm = TensafePluginManager(settings)
    pm.add_hookspecs(hookspecs)
    for module_name in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(module_name), name=module_name)
        pm.builtin_names.add(module_name)
    for plugin in plugins:
        pm.register(plugin)
    if settings.autoload:
        pm.load_entry_points()
    pm.check_pending_plugins()
    if settings.trace:
        pm.trace.root.setwriter(sys.stderr.write)
        pm.enable_tracing()
    return pm
