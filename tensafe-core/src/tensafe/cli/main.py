"""The ``tensafe`` command line: a thin layer over the orchestrator.

Every command turns :class:`tensafe.errors.TensafeError` into a one-line
message and its exit code (2 for a user mistake or a missing plugin), never a
traceback. Plugins add subcommands through ``tensafe_register_commands``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import click

from tensafe import __version__
from tensafe.cli.commands import plugins_cmd, run_cmd, train_cmd
from tensafe.cli.context import plugin_manager
from tensafe.cli.inference_cmd import inference_cmd
from tensafe.cli.server_cmds import audit_cmd, db_cmd, keys_cmd, serve_cmd
from tensafe.errors import TensafeError

CORE_COMMANDS = (plugins_cmd, run_cmd, train_cmd, inference_cmd, serve_cmd, keys_cmd, audit_cmd, db_cmd)


class TensafeGroup(click.Group):
    """The root group: core commands plus those registered by plugins."""

    def _plugin_commands(self, ctx: click.Context) -> dict[str, Any]:
        registry = plugin_manager(ctx).registry
        found = {}
        for reg in registry.registrations("command"):
            if reg.name in self.commands:
                click.echo(
                    f"warning: plugin {reg.plugin!r} registers command {reg.name!r}, a core command; ignored",
                    err=True,
                )
                continue
            found[reg.name] = reg
        return found

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(self.commands) | set(self._plugin_commands(ctx)))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands:
            return self.commands[cmd_name]
        if cmd_name in self._plugin_commands(ctx):
            command: click.Command = plugin_manager(ctx).registry.command(cmd_name)
            return command
        return None

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """List commands without building plugin commands (that would import their heavy libraries):
        a plugin command's help line is the first line of its factory's docstring."""
        plugins = self._plugin_commands(ctx)
        rows = []
        for name in self.list_commands(ctx):
            if name in self.commands:
                if self.commands[name].hidden:
                    continue
                rows.append((name, self.commands[name].get_short_help_str(limit=formatter.width - 20)))
            else:
                reg = plugins[name]
                doc = (reg.factory.__doc__ or "").strip().splitlines()
                rows.append((name, doc[0] if doc else f"(from plugin {reg.plugin})"))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except TensafeError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


@click.group(cls=TensafeGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="tensafe")
def cli() -> None:
    """TenSafe: fine-tune LoRA adapters with differential privacy, ship them as
    signed and encrypted TGSP packages, and serve them under homomorphic encryption.

    \b
    Start here:
      tensafe run                  train the embedded tiny model with DP-SGD (no network)
      tensafe run my-run.yaml      the same pipeline on your model and JSONL data
      tensafe config show          every setting, with its default
      tensafe plugins              installed plugins and any that failed to load

    Install backends as separate distributions: tensafe-torch (training and
    sampling), tensafe-privacy (accountants), tensafe-tgsp (packages),
    tensafe-he-seal (CKKS encryption).
    """


for _command in CORE_COMMANDS:
    cli.add_command(_command)


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="tensafe")
    except TensafeError as exc:  # raised while listing commands, outside any one command
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
