"""Plugins that register objects, well or badly, for registry tests."""

from __future__ import annotations

from typing import Any

import click

from tensafe import hookimpl
from tensafe.hookspecs import Register


class NamedRegistrar:
    """Registers ``factory`` as ``name`` of one kind."""

    def __init__(self, hook: str, name: str, factory: Any) -> None:
        def impl(register: Register) -> None:
            register(name, factory)

        setattr(self, hook, hookimpl(impl))


class GreetCommandPlugin:
    """Adds ``tensafe greet`` through the command hook."""

    @hookimpl
    def tensafe_register_commands(self, register: Register) -> None:
        @click.command("greet")
        @click.option("--name", default="world")
        def greet(name: str) -> None:
            """Say hello (a plugin command)."""
            click.echo(f"hello, {name}")

        def factory() -> click.Command:
            """Say hello (a plugin command)."""
            return greet

        register("greet", factory)


class ExplodingRegistrar:
    """Raises inside a registration hook."""

    @hookimpl
    def tensafe_register_ml_backends(self, register: Register) -> None:
        raise RuntimeError("boom")
