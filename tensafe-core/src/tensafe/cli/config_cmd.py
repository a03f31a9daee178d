"""``tensafe config``: validate and show run configurations."""

from __future__ import annotations

import importlib.util
import json
import textwrap
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from tensafe.cli.context import plugin_manager

if TYPE_CHECKING:
    from pydantic import BaseModel
    from pydantic.fields import FieldInfo

    from tensafe.config import RunConfig
    from tensafe.registry import Registry

COMMENT_WIDTH = 100


@click.group("config")
def config() -> None:
    """Validate and show run configurations (YAML, TOML or JSON).

    Any setting can also come from the environment:
    TENSAFE_CONFIG__DP__NOISE_MULTIPLIER=1.2 sets dp.noise_multiplier.
    """


# -- validate -------------------------------------------------------------------


def named_implementations(config: RunConfig) -> list[tuple[str, str, str]]:
    """``(field, registry kind, name)`` of every implementation the run would use."""
    named = [("backend", "ml_backend", config.backend)]
    if config.dp.enabled:
        named.append(("dp.accountant", "accountant", config.dp.accountant))
    if config.he is not None:
        named.append(("he.backend", "he_backend", config.he.backend))
    if config.tgsp is not None:
        named.append(("tgsp.loader", "tgsp_loader", config.tgsp.loader))
    if config.rl is not None:
        named += [(f"rl.rewards.{i}.name", "reward", term.name) for i, term in enumerate(config.rl.rewards)]
    return named


def _importable(path: str) -> str | None:
    """Why the reward ``package.module:attribute`` cannot be found, or None; imports at most its parent packages."""
    module = path.partition(":")[0] if ":" in path else path.rpartition(".")[0]
    try:
        found = importlib.util.find_spec(module) if module else None
    except (ImportError, ValueError) as exc:
        return f"reward {path!r} cannot be imported: {exc}"
    return None if found is not None else f"reward {path!r}: no module named {module!r}"


def missing_implementations(registry: Registry, config: RunConfig) -> list[tuple[str, str]]:
    """``(field, why)`` for each named implementation that is not installed (or whose registration was dropped)."""
    from tensafe.errors import PluginError

    problems = []
    for field, kind, name in named_implementations(config):
        if kind == "reward" and name not in registry.names(kind) and ("." in name or ":" in name):
            why = _importable(name)
            if why is not None:
                problems.append((field, why))
            continue
        try:
            registry.registration(kind, name)
        except PluginError as exc:
            problems.append((field, str(exc)))
    return problems


@config.command("validate")
@click.argument("config_file", type=click.Path(path_type=Path))
@click.pass_context
def validate(ctx: click.Context, config_file: Path) -> None:
    """Check CONFIG_FILE: every field, and that every implementation it names (ML backend,
    accountant, rewards, HE backend, TGSP loader) is installed. Prints each problem
    and exits 2 if there is any."""
    from tensafe.config import load_config
    from tensafe.errors import ConfigError

    loaded = load_config(config_file)
    problems = missing_implementations(plugin_manager(ctx).registry, loaded)
    if problems:
        raise ConfigError(f"{config_file} names implementations that are not installed:", problems)
    click.echo(f"{config_file}: valid")


# -- show -----------------------------------------------------------------------


def _section_type(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model an optional section (``HEConfig | None``) holds, if that is what it is."""
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        models = [a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        return models[0] if len(models) == 1 else None
    return None


def _comment(text: str, pad: str, tail: str = "") -> list[str]:
    """``text`` as comment lines, with ``tail`` (the default) kept whole at the end."""
    width = COMMENT_WIDTH - len(pad)
    lines = textwrap.wrap(text, width, initial_indent="# ", subsequent_indent="# ", break_on_hyphens=False)
    if tail and lines and len(lines[-1]) + 1 + len(tail) <= width:
        lines[-1] += f" {tail}"
    elif tail:
        lines.append(f"# {tail}")
    return [pad + line for line in lines]


def _value_lines(name: str, value: Any, pad: str) -> list[str]:
    import yaml

    if isinstance(value, list | dict) and not any(isinstance(v, list | dict) for v in value):
        flow = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
        return [f"{pad}{name}: {flow}"]
    dumped = yaml.safe_dump({name: value}, sort_keys=False, default_flow_style=False, width=1000)
    return [pad + line for line in dumped.splitlines()]


def _describe(info: FieldInfo, section: type[BaseModel] | None) -> str:
    text = info.description or ""
    if not text and section is not None:
        text = (section.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
    return text


def _annotated(model: BaseModel, default: BaseModel, pad: str = "") -> list[str]:
    """YAML of ``model``: each field under a comment with its description and default (taken from ``default``)."""
    lines: list[str] = []
    values, defaults = model.model_dump(mode="json"), default.model_dump(mode="json")
    for name, info in type(model).model_fields.items():
        value, section = getattr(model, name), _section_type(info.annotation)
        description = _describe(info, section)
        if section is not None and value is not None:
            inner_default = getattr(default, name)
            lines += _comment(description, pad)
            lines.append(f"{pad}{name}:")
            lines += _annotated(value, inner_default if inner_default is not None else section(), pad + "  ")
            continue
        lines += _comment(description, pad, f"(default: {json.dumps(defaults[name])})")
        lines += _value_lines(name, values[name], pad)
        if section is not None:  # an unset optional section: its settings, commented out, at their defaults
            lines.append(f"{pad}#   {name}: (when set, with its defaults)")
            lines += [f"{pad}#   {line}" for line in _annotated(section(), section(), "  ")]
    return lines


@config.command("show")
@click.argument("config_file", required=False, type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["yaml", "json"]), default="yaml", show_default=True)
def show(config_file: Path | None, fmt: str) -> None:
    """Print the resolved configuration: CONFIG_FILE (or the defaults) with
    environment overrides applied and every default filled in.

    The YAML carries, above each setting, its description and default as a
    comment (sections left unset show theirs commented out); JSON is the values alone.
    """
    from tensafe.config import RunConfig, load_config

    resolved = load_config(config_file)
    if fmt == "json":
        click.echo(json.dumps(resolved.model_dump(mode="json"), indent=2))
    else:
        click.echo("\n".join(_annotated(resolved, RunConfig())))
