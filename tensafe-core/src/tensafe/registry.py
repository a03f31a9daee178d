"""A typed view over the plugin manager: look up registered objects by kind and name.

The registry calls each registration hook once per plugin, with a
``register(name, factory)`` callback bound to that plugin, so it always knows
who registered what. Objects are checked against their interface twice: a
factory that is a class is checked when registered, and every object a factory
returns is checked before anyone uses it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from tensafe.errors import DuplicateRegistrationError, InterfaceError, NotInstalledError, PluginError, TensafeError

if TYPE_CHECKING:
    import click

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
    factory: Callable[[], Any]
    plugin: str
    distribution: str | None


def _interface(kind: str) -> type | None:
    if kind == "command":
        import click

        return click.Command
    from tensafe.interfaces import INTERFACES

    return INTERFACES.get(kind)


def _check(kind: str, name: str, plugin: str, obj: object, *, is_class: bool) -> None:
    interface = _interface(kind)
    if interface is None:
        return
    ok = issubclass(cast(type, obj), interface) if is_class else isinstance(obj, interface)
    if not ok:
        what = f"class {cast(type, obj).__qualname__}" if is_class else f"a {type(obj).__qualname__} object"
        raise InterfaceError(
            f"{KINDS[kind].label} {name!r} from plugin {plugin!r} is {what}, which is not a {interface.__name__}"
        )
    if is_class and inspect.isabstract(obj):
        missing = sorted(getattr(obj, "__abstractmethods__", ()))
        raise InterfaceError(
            f"{KINDS[kind].label} {name!r} from plugin {plugin!r} does not implement: {', '.join(missing)}"
        )


class Registry:
    """Registered objects of every kind, built lazily from a plugin manager."""

    def __init__(self, pm: TensafePluginManager) -> None:
        self._pm = pm
        self._entries: dict[str, dict[str, Registration]] = {}

    def _collect(self, kind: str) -> dict[str, Registration]:
        if kind in self._entries:
            return self._entries[kind]
        if kind not in KINDS:
            raise KeyError(f"unknown registry kind {kind!r}; known: {sorted(KINDS)}")
        entries: dict[str, Registration] = {}
        hook_name = KINDS[kind].hook
        caller = getattr(self._pm.hook, hook_name)
        others = list(self._pm.get_plugins())
        for impl in caller.get_hookimpls():
            plugin_name = impl.plugin_name
            distribution, _ = self._pm.distribution_of(plugin_name)

            def register(
                name: str, factory: Callable[[], Any], _plugin: str = plugin_name, _dist: str | None = distribution
            ) -> None:
                if not isinstance(name, str) or not name:
                    raise InterfaceError(f"plugin {_plugin!r} registered a {KINDS[kind].label} with an empty name")
                if not callable(factory):
                    raise InterfaceError(
                        f"{KINDS[kind].label} {name!r} from plugin {_plugin!r}: factory is not callable"
                    )
                if name in entries:
                    first = entries[name]
                    raise DuplicateRegistrationError(
                        f"{KINDS[kind].label} {name!r} is registered by plugin {first.plugin!r}"
                        f" ({first.distribution or 'unknown distribution'}) and by plugin {_plugin!r}"
                        f" ({_dist or 'unknown distribution'})"
                    )
                if inspect.isclass(factory):
                    _check(kind, name, _plugin, factory, is_class=True)
                entries[name] = Registration(kind, name, factory, _plugin, _dist)

            # Call through pluggy (so tracing sees it) but with this plugin alone.
            single = self._pm.subset_hook_caller(hook_name, remove_plugins=[p for p in others if p is not impl.plugin])
            try:
                single(register=register)
            except TensafeError:
                raise
            except Exception as exc:  # a broken plugin is named, not allowed to look like a core bug
                raise PluginError(f"plugin {plugin_name!r} failed in {hook_name}: {type(exc).__name__}: {exc}") from exc
        self._entries[kind] = entries
        return entries

    def registrations(self, kind: str) -> list[Registration]:
        """Every registration of ``kind``, sorted by name."""
        return sorted(self._collect(kind).values(), key=lambda r: r.name)

    def names(self, kind: str) -> list[str]:
        return sorted(self._collect(kind))

    def registration(self, kind: str, name: str) -> Registration:
        """The registration of ``name``; an error lists alternatives and what to install."""
        entries = self._collect(kind)
        if name in entries:
            return entries[name]
        label = KINDS[kind].label
        install = PROVIDERS.get((kind, name))
        available = sorted(entries)
        message = f"no {label} {name!r} installed"
        if install:
            failed = [f for f in self._pm.load_failures if f.distribution == install]
            if failed:
                message += f"; {install} is installed but failed to load: {failed[0].error}"
            else:
                message += f"; pip install {install}"
        message += f" (available: {', '.join(available) if available else 'none'})"
        raise NotInstalledError(message, kind=kind, name=name, available=available, install=install)

    def create(self, kind: str, name: str) -> Any:
        """Call the factory registered as ``name`` and check what it returns."""
        reg = self.registration(kind, name)
        obj = reg.factory()
        _check(kind, name, reg.plugin, obj, is_class=False)
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
