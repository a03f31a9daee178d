"""TenSafe core's own plugin: built-ins go through the same path as everyone's."""

from __future__ import annotations

from tensafe.hookspecs import Register, hookimpl


@hookimpl
def tensafe_register_commands(register: Register) -> None:
    def config_group() -> object:
        """Validate and show run configurations (YAML, TOML or JSON)."""
        from tensafe.cli.config_cmd import config

        return config

    register("config", config_group)


@hookimpl
def tensafe_register_rewards(register: Register) -> None:
    from tensafe.rl.rewards import BUILTIN_REWARDS

    for name, factory in BUILTIN_REWARDS.items():
        register(name, factory)
