"""A typed view over the plugin manager: look up registered objects by kind and name.

The registry calls each registration hook once per plugin, with a
``register(name, factory)`` callback bound to that plugin, so it always knows
who registered what. Objects are checked against their interface twice: a
factory that is a class is checked when registered, and every object a factory
returns is checked before anyone uses it.

One plugin's mistake never disables a kind for everyone. A bad registration (an
empty name, a factory that is not callable, a class that is not the interface
or is abstract, a registration hook that raises) is dropped and recorded in the
plugin manager's ``load_failures``, naming the plugin and its distribution;
everything else works. A name registered more than once for one kind is
dropped for *every* plugin that registered it: looking it up is an error that
names them all, so nobody gets one of them by chance. In strict mode
(``TENSAFE_STRICT_PLUGINS=1``) each of these raises instead.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from tensafe.errors import (
    DuplicateRegistrationError,
    InterfaceError,
    NotInstalledError,
    PluginError,
    PluginFactoryError,
    TensafeError,
)

if TYPE_CHECKING:
    import click
    from pluggy import HookImpl

    from tensafe.interfaces import HEBackend, MLBackend, PrivacyAccountant, RewardFunction, TGSPLoader
    from tensafe.plugins import TensafePluginManager


@dataclass(frozen=True)
class Kind:
    """One kind of registered object."""

    key: str
    label: str
    hook: str


KINDS: dict[str, Kind] = {
    k.key: k
    for k in (
        Kind("ml_backend", "ML backend", "tensafe_register_ml_backends"),
        Kind("he_backend", "HE backend", "tensafe_register_he_backends"),
        Kind("accountant", "privacy accountant", "tensafe_register_accountants"),
        Kind("tgsp_loader", "TGSP loader", "tensafe_register_tgsp_loaders"),
        Kind("reward", "reward function", "tensafe_register_rewards"),
        Kind("command", "CLI command", "tensafe_register_commands"),
    )
}

#: Which of TenSafe's own distributions provides each well-known name.
PROVIDERS: dict[tuple[str, str], str] = {
    ("ml_backend", "torch"): "tensafe-torch",
    ("he_backend", "seal-ckks"): "tensafe-he-seal",
    ("accountant", "rdp"): "tensafe-privacy",
    ("accountant", "pld"): "tensafe-privacy",
    ("accountant", "prv"): "tensafe-privacy",
    ("tgsp_loader", "tgsp"): "tensafe-tgsp",
}


@dataclass(frozen=True)
class Registration:
    """Who registered what."""

    kind: str
    name: str
    factory: Callable[..., Any]
    plugin: str
    distribution: str | None


@dataclass
class _Collected:
    """One kind's registrations: those usable, and the names that were dropped with why."""

    entries: dict[str, Registration] = field(default_factory=dict)
    #: name -> the error looking it up raises (a duplicate, or the only registration was bad).
    dropped: dict[str, PluginError] = field(default_factory=dict)


def _interface(kind: str) -> type | None:
    if kind == "command":
        import click

        return click.Command
    from tensafe.interfaces import INTERFACES

    return INTERFACES.get(kind)


def _check(kind: str, name: str, who: str, obj: object, *, is_class: bool) -> None:
    """Raise :class:`InterfaceError` unless ``obj`` (a class, or what a factory returned) fits ``kind``."""
    interface = _interface(kind)
    if interface is None:
        return
    ok = issubclass(cast(type, obj), interface) if is_class else isinstance(obj, interface)
    if not ok:
        what = f"class {cast(type, obj).__qualname__}" if is_class else f"a {type(obj).__qualname__} object"
        raise InterfaceError(f"{KINDS[kind].label} {name!r} from {who} is {what}, which is not a {interface.__name__}")
    if is_class and inspect.isabstract(obj):
        missing = sorted(getattr(obj, "__abstractmethods__", ()))
        raise InterfaceError(f"{KINDS[kind].label} {name!r} from {who} does not implement: {', '.join(missing)}")


class Registry:
    """Registered objects of every kind, built lazily from a plugin manager."""

    def __init__(self, pm: TensafePluginManager) -> None:
        self._pm = pm
        self._kinds: dict[str, _Collected] = {}

    def _drop(self, plugin: str, exc: PluginError) -> None:
        """Strict: raise ``exc``. Otherwise record it against ``plugin`` and carry on without the registration."""
        if self._pm.settings.strict:
            raise exc
        self._pm.record_registration_failure(plugin, str(exc))

    def _collect(self, kind: str) -> _Collected:
        if kind in self._kinds:
            return self._kinds[kind]
        if kind not in KINDS:
            raise KeyError(f"unknown registry kind {kind!r}; known: {sorted(KINDS)}")
        collected = _Collected()
        offered: dict[str, list[Registration]] = {}
        for impl in getattr(self._pm.hook, KINDS[kind].hook).get_hookimpls():
            for reg in self._registrations_of(kind, impl, collected):
                offered.setdefault(reg.name, []).append(reg)
        for name, regs in offered.items():
            if len(regs) == 1:
                collected.entries[name] = regs[0]
                collected.dropped.pop(name, None)  # someone else's bad registration of it was dropped
            else:
                self._drop_duplicate(kind, name, regs, collected)
        self._kinds[kind] = collected
        return collected

    def _registrations_of(self, kind: str, impl: HookImpl, collected: _Collected) -> list[Registration]:
        """Call one plugin's registration hook with a ``register`` bound to it; what it registered well.

        A bad registration is dropped (and recorded in ``collected.dropped``); if the
        hook raises, what it registered before failing is suspect and none of it is kept.
        """
        label, hook_name = KINDS[kind].label, KINDS[kind].hook
        plugin = impl.plugin_name
        who = self._pm.describe(plugin)
        distribution, _ = self._pm.distribution_of(plugin)
        registered: list[Registration] = []

        def register(name: str, factory: Callable[..., Any]) -> None:
            try:
                if not isinstance(name, str) or not name:
                    raise InterfaceError(f"{who} registered a {label} with an empty name")
                if not callable(factory):
                    raise InterfaceError(f"{label} {name!r} from {who}: factory is not callable")
                if inspect.isclass(factory):
                    _check(kind, name, who, factory, is_class=True)
            except InterfaceError as exc:
                if isinstance(name, str) and name:
                    collected.dropped.setdefault(name, exc)
                self._drop(plugin, exc)
                return
            registered.append(Registration(kind, name, factory, plugin, distribution))

        # Call through pluggy (so tracing sees it) but with this plugin alone.
        others = [p for p in self._pm.get_plugins() if p is not impl.plugin]
        try:
            self._pm.subset_hook_caller(hook_name, remove_plugins=others)(register=register)
        except Exception as exc:  # a broken plugin is named, not allowed to look like a core bug
            if self._pm.settings.strict and isinstance(exc, TensafeError):
                raise  # e.g. register() refusing a registration, in strict mode
            self._drop(
                plugin, PluginError(f"{who} failed in {hook_name}: {type(exc).__name__}: {exc}; it registers nothing")
            )
            return []
        return registered

    def _drop_duplicate(self, kind: str, name: str, regs: list[Registration], collected: _Collected) -> None:
        """A name registered more than once is used by none of its registrants: naming it is an error listing them."""
        conflict = DuplicateRegistrationError(
            f"{KINDS[kind].label} {name!r} is registered by "
            + " and by ".join(self._pm.describe(r.plugin) for r in regs)
            + "; none of them is used. Uninstall all but one, or load only one with TENSAFE_LOAD_PLUGINS"
        )
        collected.dropped[name] = conflict
        for plugin in dict.fromkeys(r.plugin for r in regs):
            self._drop(plugin, conflict)

    def collect_all(self) -> None:
        """Run every registration hook now (they are import-light), so every failure is known or, strict, raised."""
        for kind in KINDS:
            self._collect(kind)

    def registrations(self, kind: str) -> list[Registration]:
        """Every usable registration of ``kind``, sorted by name."""
        return sorted(self._collect(kind).entries.values(), key=lambda r: r.name)

    def names(self, kind: str) -> list[str]:
        """The names of ``kind`` that can be looked up."""
        return sorted(self._collect(kind).entries)

    def registration(self, kind: str, name: str) -> Registration:
        """The registration of ``name``; an error lists alternatives and what to install."""
        collected = self._collect(kind)
        if name in collected.entries:
            return collected.entries[name]
        if name in collected.dropped:
            error = collected.dropped[name]
            raise type(error)(str(error))
        label = KINDS[kind].label
        install = PROVIDERS.get((kind, name))
        available = sorted(collected.entries)
        message = f"no {label} {name!r} installed"
        if install:
            failed = [f for f in self._pm.load_failures if f.distribution == install and f.stage == "load"]
            if failed:
                message += f"; {install} is installed but failed to load: {failed[0].error}"
            else:
                # Not on a package index yet: the distribution installs from its folder in a TenSafe checkout.
                message += f"; python -m pip install ./{install} (from a TenSafe checkout)"
        message += f" (available: {', '.join(available) if available else 'none'})"
        raise NotInstalledError(message, kind=kind, name=name, available=available, install=install)

    def create(self, kind: str, name: str, /, **options: Any) -> Any:
        """Call the factory registered as ``name`` (with ``options``, for rewards) and check what it returns.

        Whatever the factory raises (a lazy import that is missing, a
        constructor that fails) becomes a :class:`PluginFactoryError` naming the
        plugin and the registered name.
        """
        reg = self.registration(kind, name)
        who = self._pm.describe(reg.plugin)
        try:
            obj = reg.factory(**options)
        except Exception as exc:  # third-party code: any failure is reported as the plugin's
            reason = str(exc) if isinstance(exc, TensafeError) else f"{type(exc).__name__}: {exc}"
            raise PluginFactoryError(f"{KINDS[kind].label} {name!r} from {who} could not be created: {reason}") from exc
        _check(kind, name, who, obj, is_class=False)
        return obj

    def ml_backend(self, name: str) -> MLBackend:
        return cast("MLBackend", self.create("ml_backend", name))

    def he_backend(self, name: str) -> HEBackend:
        return cast("HEBackend", self.create("he_backend", name))

    def accountant(self, name: str) -> PrivacyAccountant:
        return cast("PrivacyAccountant", self.create("accountant", name))

    def tgsp_loader(self, name: str) -> TGSPLoader:
        return cast("TGSPLoader", self.create("tgsp_loader", name))

    def reward(self, name: str) -> RewardFunction:
        return cast("RewardFunction", self.create("reward", name))

    def command(self, name: str) -> click.Command:
        return cast("click.Command", self.create("command", name))
