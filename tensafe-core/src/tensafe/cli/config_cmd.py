"""``tensafe config``: validate and show run configurations."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.group("config")
def config() -> None:
    """Validate and show run configurations (YAML, TOML or JSON).

    Any setting can also come from the environment:
    TENSAFE_CONFIG__DP__NOISE_MULTIPLIER=1.2 sets dp.noise_multiplier.
    """


@config.command("validate")
@click.argument("config_file", type=click.Path(path_type=Path))
def validate(config_file: Path) -> None:
    """Check CONFIG_FILE; print each invalid field and exit 2 if any."""
    from tensafe.config import load_config

    load_config(config_file)
    click.echo(f"{config_file}: valid")


@config.command("show")
@click.argument("config_file", required=False, type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["yaml", "json"]), default="yaml", show_default=True)
def show(config_file: Path | None, fmt: str) -> None:
    """Print the resolved configuration: CONFIG_FILE (or the defaults) with
    environment overrides applied and every default filled in."""
    import yaml

    from tensafe.config import load_config

    data = json.loads(load_config(config_file).model_dump_json())
    if fmt == "json":
        click.echo(json.dumps(data, indent=2))
    else:
        click.echo(yaml.safe_dump(data, sort_keys=False), nl=False)
