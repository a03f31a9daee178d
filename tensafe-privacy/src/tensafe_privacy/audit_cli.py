"""``tensafe privacy audit``: measure a config's DP training against its claimed epsilon, in one run."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from tensafe.cli.context import plugin_manager


@click.command("audit")
@click.argument("config_file", metavar="[CONFIG]", required=False, type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--mode",
    type=click.Choice(["black-box", "white-box"]),
    default="black-box",
    show_default=True,
    help="black-box: canary records scored by their loss (any backend); white-box: gradient canaries read from "
    "every step's noised gradient (backends declaring gradient_canaries), much tighter.",
)
@click.option("--canaries", "-m", type=click.IntRange(min=2), default=1000, show_default=True, help="Canaries m.")
@click.option(
    "--guesses", "-k", type=click.IntRange(min=1), help="Membership guesses k, fixed before training [default: m / 5]."
)
@click.option(
    "--confidence",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.95,
    show_default=True,
    help="Probability with which the lower bound holds.",
)
@click.option(
    "--run-dir",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    help="Write the audit into this run's certificate (report.json) and report.txt; without CONFIG, audit the "
    "config the run recorded.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the audit as JSON.")
@click.pass_context
def audit_cmd(
    ctx: click.Context,
    config_file: Path | None,
    mode: str,
    canaries: int,
    guesses: int | None,
    confidence: float,
    run_dir: Path | None,
    as_json: bool,
) -> None:
    """Audit CONFIG's DP training: an empirical lower bound on epsilon from one training run.

    Runs the one-run audit of Steinke, Nasr and Jagielski (NeurIPS 2023) on a
    copy of the run CONFIG describes (the embedded default without CONFIG):
    m canaries, each included with probability 1/2, go into one training run
    with CONFIG's DP settings; the auditor guesses the membership of the k
    canaries it is most sure of, and the right guesses give a lower bound on
    epsilon at the stated confidence. Nothing of the audit enters a real run
    or adapter. Exits 1 when the lower bound exceeds the claimed epsilon.

    \b
    Examples:
      tensafe privacy audit run.yaml
      tensafe privacy audit run.yaml --mode white-box --canaries 1000 --json
      tensafe privacy audit --run-dir tensafe-runs/my-run --mode white-box
    """
    from tensafe.auditing import AuditSettings, attach, audit, config_of_run, render
    from tensafe.config import load_config
    from tensafe.engine.ledger import AUDIT_CONSISTENT

    config = config_of_run(run_dir) if config_file is None and run_dir is not None else load_config(config_file)
    settings = AuditSettings(
        mode="white-box" if mode == "white-box" else "black-box",
        canaries=canaries,
        guesses=guesses,
        confidence=confidence,
    )
    settings.check()
    progress: Any = click.progressbar(
        length=config.training.steps, label=f"auditing ({mode}, {canaries} canaries)", file=sys.stderr, show_pos=True
    )
    with progress as bar:
        done = 0

        def advance(step: int) -> None:
            nonlocal done
            bar.update(step - done)
            done = step

        outcome = audit(config, plugin_manager(ctx), settings, advance)
    if run_dir is not None:
        attach(run_dir, outcome, config)
    summary = outcome.summary
    if as_json:
        click.echo(json.dumps(summary.model_dump(mode="json"), indent=2))
    else:
        click.echo("\n".join(render(summary)))
        if run_dir is not None:
            click.echo(f"  written to: {run_dir / 'report.json'} (privacy.audited)")
    if summary.verdict != AUDIT_CONSISTENT:
        ctx.exit(1)
