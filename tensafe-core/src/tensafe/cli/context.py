"""Per-invocation state shared by the CLI's commands."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from tensafe.plugins import TensafePluginManager


def plugin_manager(ctx: click.Context) -> TensafePluginManager:
    """The invocation's plugin manager, created on first use (tests may pass one in ``obj``).

    On first use every registration hook runs (they are import-light), so a
    plugin's bad registration is reported once, naming the plugin, before any
    work: a warning here (the registration is dropped), or in strict mode the
    error that ends the command. Hook output is routed to standard error, so a
    plugin that prints cannot corrupt ``--json`` output.
    """
    obj = ctx.find_root().ensure_object(dict)
    if "pm" not in obj:
        from tensafe.plugins import create_plugin_manager

        obj["pm"] = create_plugin_manager()
    pm: TensafePluginManager = obj["pm"]
    if not obj.get("pm_checked"):
        pm.route_hook_output_to_stderr()
        pm.registry.collect_all()
        obj["pm_checked"] = True
        warned: set[str] = set()
        for failure in pm.load_failures:
            if failure.stage == "load":
                click.echo(
                    f"warning: plugin {failure.name!r} failed to load ({failure.error}); see `tensafe plugins`",
                    err=True,
                )
            elif failure.error not in warned:  # a duplicate is recorded once per plugin involved
                warned.add(failure.error)
                click.echo(f"warning: registration dropped: {failure.error} (see `tensafe plugins`)", err=True)
    return pm
