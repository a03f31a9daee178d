"""Per-invocation state shared by the CLI's commands."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from tensafe.plugins import TensafePluginManager


def plugin_manager(ctx: click.Context) -> TensafePluginManager:
    """The invocation's plugin manager, created on first use (tests may pass one in ``obj``)."""
    obj = ctx.find_root().ensure_object(dict)
    if "pm" not in obj:
        from tensafe.plugins import create_plugin_manager

        obj["pm"] = created = create_plugin_manager()
        for failure in created.load_failures:
            click.echo(
                f"warning: plugin {failure.name!r} failed to load ({failure.error}); see `tensafe plugins`", err=True
            )
    pm: TensafePluginManager = obj["pm"]
    return pm
