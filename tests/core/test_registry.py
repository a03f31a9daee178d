"""The registry: typed lookup, duplicates, unknown names and interface checks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tensafe.errors import (
    DuplicateRegistrationError,
    InterfaceError,
    NotInstalledError,
    PluginError,
    PluginFactoryError,
)
from tensafe.interfaces import MLBackend
from tensafe.plugins import PluginSettings, TensafePluginManager, create_plugin_manager
from tests.mocks.accountants import LinearAccountantPlugin, LinearTestAccountant
from tests.mocks.registrations import ExplodingRegistrar, NamedRegistrar

Register = Callable[[object], object]


def test_lookup_returns_a_fresh_checked_object(tensafe_plugin_manager: TensafePluginManager) -> None:
    tensafe_plugin_manager.register(LinearAccountantPlugin(), name="linear-plugin")
    registry = tensafe_plugin_manager.registry
    first, second = registry.accountant("linear-test"), registry.accountant("linear-test")
    assert isinstance(first, LinearTestAccountant) and first is not second
    [reg] = registry.registrations("accountant")
    assert (reg.plugin, reg.distribution) == ("linear-plugin", None)


def test_duplicate_name_names_both_plugins(
    tensafe_plugin_manager: TensafePluginManager, register_tensafe_plugin: Register
) -> None:
    first = NamedRegistrar("tensafe_register_accountants", "rdp", LinearTestAccountant)
    second = NamedRegistrar("tensafe_register_accountants", "rdp", LinearTestAccountant)
    tensafe_plugin_manager.register(first, name="first-plugin")
    tensafe_plugin_manager.register(second, name="second-plugin")
    with pytest.raises(DuplicateRegistrationError) as info:
        tensafe_plugin_manager.registry.accountant("rdp")
    assert "'first-plugin'" in str(info.value) and "'second-plugin'" in str(info.value)


def test_unknown_name_lists_available_and_what_to_install(
    tensafe_plugin_manager: TensafePluginManager, register_tensafe_plugin: Register
) -> None:
    register_tensafe_plugin(LinearAccountantPlugin())
    with pytest.raises(NotInstalledError) as info:
        tensafe_plugin_manager.registry.accountant("pld")
    message = str(info.value)
    assert "no privacy accountant 'pld' installed" in message
    assert "pip install ./tensafe-privacy" in message
    assert "linear-test" in message
    assert info.value.exit_code == 2


def test_unknown_third_party_name_has_no_install_hint(tensafe_plugin_manager: TensafePluginManager) -> None:
    with pytest.raises(NotInstalledError) as info:
        tensafe_plugin_manager.registry.ml_backend("jax")
    assert info.value.install is None and "pip install" not in str(info.value)


def test_registered_class_that_is_not_the_interface_is_rejected(
    tensafe_plugin_manager: TensafePluginManager,
) -> None:
    tensafe_plugin_manager.register(NamedRegistrar("tensafe_register_he_backends", "bogus", dict), name="sloppy")
    with pytest.raises(InterfaceError, match="HE backend 'bogus' from plugin 'sloppy' is class dict, which is not"):
        tensafe_plugin_manager.registry.names("he_backend")


def test_registered_abstract_class_is_rejected(tensafe_plugin_manager: TensafePluginManager) -> None:
    class Half(MLBackend):
        pass

    tensafe_plugin_manager.register(NamedRegistrar("tensafe_register_ml_backends", "half", Half), name="half")
    with pytest.raises(InterfaceError, match="does not implement: .*forward_backward"):
        tensafe_plugin_manager.registry.names("ml_backend")


def test_factory_returning_the_wrong_type_is_rejected_when_created(
    tensafe_plugin_manager: TensafePluginManager,
) -> None:
    tensafe_plugin_manager.register(
        NamedRegistrar("tensafe_register_accountants", "wrong", lambda: object()), name="wrongful"
    )
    assert tensafe_plugin_manager.registry.names("accountant") == ["wrong"]
    with pytest.raises(InterfaceError, match="privacy accountant 'wrong' from plugin 'wrongful'"):
        tensafe_plugin_manager.registry.accountant("wrong")


def test_command_factory_must_return_a_click_command(tensafe_plugin_manager: TensafePluginManager) -> None:
    tensafe_plugin_manager.register(NamedRegistrar("tensafe_register_commands", "nope", lambda: 42), name="cmds")
    with pytest.raises(InterfaceError, match="not a Command"):
        tensafe_plugin_manager.registry.command("nope")


def test_non_callable_factory_is_rejected(tensafe_plugin_manager: TensafePluginManager) -> None:
    tensafe_plugin_manager.register(NamedRegistrar("tensafe_register_rewards", "r", 3), name="rewards")
    with pytest.raises(InterfaceError, match="factory is not callable"):
        tensafe_plugin_manager.registry.names("reward")


def test_reward_functions_are_checked_as_callables(tensafe_plugin_manager: TensafePluginManager) -> None:
    def exact(prompt: str, completion: str, reference: str | None) -> float:
        return float(completion.strip() == (reference or "").strip())

    tensafe_plugin_manager.register(NamedRegistrar("tensafe_register_rewards", "exact", lambda: exact), name="rw")
    assert tensafe_plugin_manager.registry.reward("exact")("q", " 4", "4") == 1.0


def test_a_registration_hook_that_raises_is_named(tensafe_plugin_manager: TensafePluginManager) -> None:
    tensafe_plugin_manager.register(ExplodingRegistrar(), name="exploding")
    with pytest.raises(PluginError, match="plugin 'exploding' failed in tensafe_register_ml_backends"):
        tensafe_plugin_manager.registry.names("ml_backend")


def test_registry_sees_plugins_registered_later(
    tensafe_plugin_manager: TensafePluginManager, register_tensafe_plugin: Register
) -> None:
    assert tensafe_plugin_manager.registry.names("accountant") == []
    register_tensafe_plugin(LinearAccountantPlugin())
    assert tensafe_plugin_manager.registry.names("accountant") == ["linear-test"]


def test_tgsp_loaders_register_and_resolve(tensafe_plugin_manager: TensafePluginManager, tmp_path: Path) -> None:
    from tests.mocks.tgsp import JSONManifestLoader

    tensafe_plugin_manager.register(
        NamedRegistrar("tensafe_register_tgsp_loaders", "json", JSONManifestLoader), name="loaders"
    )
    package = tmp_path / "p.json"
    package.write_text('{"package_id": "abc"}')
    assert tensafe_plugin_manager.registry.tgsp_loader("json").inspect(package) == {"package_id": "abc"}
    with pytest.raises(NotInstalledError, match="pip install ./tensafe-tgsp"):
        tensafe_plugin_manager.registry.tgsp_loader("tgsp")


# -- outside strict mode: one plugin's mistake is dropped, named, and nothing else breaks --------------------


def lenient_plugin_manager(*plugins: tuple[str, object]) -> TensafePluginManager:
    pm = create_plugin_manager(settings=PluginSettings(autoload=False))
    for name, plugin in plugins:
        pm.register(plugin, name=name)
    return pm


def test_a_duplicate_name_is_dropped_for_every_plugin_that_registered_it() -> None:
    pm = lenient_plugin_manager(
        ("first-plugin", NamedRegistrar("tensafe_register_accountants", "rdp", LinearTestAccountant)),
        ("second-plugin", NamedRegistrar("tensafe_register_accountants", "rdp", LinearTestAccountant)),
        ("linear-plugin", LinearAccountantPlugin()),
    )
    assert pm.registry.names("accountant") == ["linear-test"]
    assert isinstance(pm.registry.accountant("linear-test"), LinearTestAccountant)
    with pytest.raises(DuplicateRegistrationError, match="none of them is used") as info:
        pm.registry.accountant("rdp")
    assert "'first-plugin'" in str(info.value) and "'second-plugin'" in str(info.value)
    assert sorted(f.name for f in pm.load_failures) == ["first-plugin", "second-plugin"]
    assert {f.stage for f in pm.load_failures} == {"register"}


def test_a_bad_class_is_dropped_alone_and_its_name_says_why() -> None:
    pm = lenient_plugin_manager(
        ("sloppy", NamedRegistrar("tensafe_register_accountants", "bogus", dict)),
        ("linear-plugin", LinearAccountantPlugin()),
    )
    assert pm.registry.names("accountant") == ["linear-test"]
    with pytest.raises(InterfaceError, match="'bogus' from plugin 'sloppy' is class dict"):
        pm.registry.accountant("bogus")
    [failure] = pm.load_failures
    assert failure.name == "sloppy" and "not a PrivacyAccountant" in failure.error


def test_another_plugins_bad_registration_does_not_shadow_a_good_one() -> None:
    pm = lenient_plugin_manager(
        ("sloppy", NamedRegistrar("tensafe_register_accountants", "linear-test", dict)),
        ("linear-plugin", LinearAccountantPlugin()),
    )
    assert isinstance(pm.registry.accountant("linear-test"), LinearTestAccountant)
    assert [f.name for f in pm.load_failures] == ["sloppy"]


def test_failures_are_recorded_once_however_often_the_registry_is_rebuilt() -> None:
    pm = lenient_plugin_manager(("sloppy", NamedRegistrar("tensafe_register_rewards", "r", 3)))
    pm.registry.names("reward")
    pm.register(LinearAccountantPlugin())  # invalidates the registry
    pm.registry.names("reward")
    assert len(pm.load_failures) == 1


def test_a_factory_that_raises_is_a_tensafe_error_naming_plugin_and_name(
    tensafe_plugin_manager: TensafePluginManager,
) -> None:
    def needs_a_library() -> object:
        raise ModuleNotFoundError("No module named 'jax'")

    tensafe_plugin_manager.register(
        NamedRegistrar("tensafe_register_ml_backends", "jax", needs_a_library), name="jax-plugin"
    )
    with pytest.raises(PluginFactoryError) as info:
        tensafe_plugin_manager.registry.ml_backend("jax")
    assert str(info.value) == (
        "ML backend 'jax' from plugin 'jax-plugin' could not be created: ModuleNotFoundError: No module named 'jax'"
    )
    assert info.value.exit_code == 2
