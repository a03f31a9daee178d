"""The core commands plugins, run and train, and the helpers every command module shares."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from tensafe.cli.context import plugin_manager
from tensafe.cli.launch import Launch, launch_options
from tensafe.errors import UsageError
from tensafe.hookspecs import hookimpl

CONFIG_ARG = click.argument("config_file", metavar="[CONFIG]", required=False, type=click.Path(path_type=Path))


def load_with_overrides(config_file: Path | None, **overrides: Any) -> Any:
    from tensafe.config import build_config, load_config

    config = load_config(config_file)
    data = config.model_dump()
    changed = False
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        node[leaf] = value
        changed = True
    return build_config(data, source="command-line options", environ={}) if changed else config


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


# -- plugins ------------------------------------------------------------------


def plugin_listing(pm: Any, *, include_builtin: bool = False, hook: str | None = None) -> list[dict[str, Any]]:
    """What ``tensafe plugins`` prints: one row per plugin, with the errors attributed to it.

    A loaded plugin one of whose registrations was dropped keeps its row, with
    the reasons in ``error``; a plugin that failed to load has a row of its own.
    """
    from tensafe.registry import KINDS

    provides: dict[str, dict[str, list[str]]] = {}
    for kind in KINDS:
        for reg in pm.registry.registrations(kind):
            provides.setdefault(reg.plugin, {}).setdefault(kind, []).append(reg.name)
    dropped: dict[str, list[str]] = {}
    for failure in pm.load_failures:
        if failure.stage == "register":
            dropped.setdefault(failure.name, []).append(failure.error)
    rows: list[dict[str, Any]] = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda item: item[0]):
        if plugin is None or (name in pm.builtin_names and not include_builtin):
            continue
        hooks = sorted(caller.name for caller in pm.get_hookcallers(plugin) or [])
        if hook is not None and hook not in hooks:
            continue
        distribution, version = pm.distribution_of(name)
        errors = dropped.get(name)
        rows.append(
            {
                "name": name,
                "distribution": distribution,
                "version": version,
                "hooks": hooks,
                "provides": provides.get(name, {}),
                "error": "; ".join(errors) if errors else None,
            }
        )
    for failure in pm.load_failures:
        if hook is None and failure.stage == "load":
            rows.append({**failure.to_dict(), "hooks": [], "provides": {}})
    return rows


@click.command("plugins")
@click.option("--all", "include_builtin", is_flag=True, help="Include TenSafe core's built-in plugin.")
@click.option("--hook", metavar="NAME", help="Only plugins implementing this hook.")
@click.pass_context
def plugins_cmd(ctx: click.Context, include_builtin: bool, hook: str | None) -> None:
    """List installed plugins as JSON: name, distribution, version, hooks,
    what each provides, and the error of any plugin that failed to load.

    \b
    Switches (environment):
      TENSAFE_LOAD_PLUGINS=a,b          load only these entry points
      TENSAFE_DISABLE_PLUGIN_AUTOLOAD=1 load no entry points
      TENSAFE_STRICT_PLUGINS=1          any load failure is fatal
      TENSAFE_TRACE_PLUGINS=1           trace every hook call to stderr
    """
    emit_json(plugin_listing(plugin_manager(ctx), include_builtin=include_builtin, hook=hook))


# -- training -----------------------------------------------------------------


class _ProgressReporter:
    """Draws the progress bar by observing steps through the lifecycle hooks."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.last: dict[str, float] = {}
        self.step = 0

    @hookimpl
    def tensafe_report_step(self, step: int, metrics: dict[str, float]) -> None:
        self.last = metrics
        if self.bar is not None:
            self.bar.update(step - self.step)  # an RL step may take several optimizer steps
        self.step = step

    @hookimpl
    def tensafe_warn_budget(self, epsilon: float, target_epsilon: float) -> None:
        click.echo(
            f"\nwarning: {epsilon / target_epsilon:.0%} of the privacy budget spent "
            f"(epsilon {epsilon:.3f} of {target_epsilon:g})",
            err=True,
        )


def _describe(metrics: dict[str, float]) -> str:
    """The progress bar's text: only what the release gate let out (under DP: epsilon, held-out values)."""
    parts = []
    if "reward" in metrics:
        parts.append(f"reward {metrics['reward']:.3f}")
    elif "loss" in metrics:
        parts.append(f"loss {metrics['loss']:.3f}")
    for key, label in (("held_out_loss", "held-out loss"), ("held_out_reward", "held-out reward")):
        if key in metrics:
            parts.append(f"{label} {metrics[key]:.3f}")
    if "epsilon" in metrics:
        parts.append(f"eps {metrics['epsilon']:.3f}")
    return "  ".join(parts)


def launched_as_worker() -> bool:
    """Whether a launcher (torchrun, or ``--nproc-per-node``) started this process as one worker of a run."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def _train(
    ctx: click.Context,
    config_file: Path | None,
    *,
    evaluate: bool,
    as_json: bool,
    resume: Path | None,
    launch: Launch | None = None,
    **overrides: Any,
) -> None:
    from tensafe.engine.state import recover_checkpoint
    from tensafe.orchestrator import TenSafeOrchestrator

    config = load_with_overrides(config_file, **overrides)
    worker = launched_as_worker()
    if launch is not None and worker:
        raise UsageError("this process is already a launched worker (torchrun); leave out --nproc-per-node")
    if resume is not None and not worker:
        recover_checkpoint(resume / "checkpoint")
    if resume is not None and not (resume / "checkpoint").is_dir():
        raise UsageError(f"--resume {resume}: no checkpoint there (expected {resume / 'checkpoint'})")
    if launch is not None:
        launch.run(config, resume=resume)
        return
    pm = plugin_manager(ctx)
    orchestrator = TenSafeOrchestrator(config, plugin_manager=pm)
    prepared = orchestrator.prepare(resume_from=resume, distributed=worker)
    try:
        if resume is not None:
            orchestrator.load_checkpoint(prepared, resume / "checkpoint")
        if not prepared.leader:  # the leader shows progress and writes the report; the others only train
            orchestrator.run(evaluate=evaluate, prepared=prepared, run_dir=resume, resume=resume is not None)
            return
        _lead(pm, orchestrator, prepared, evaluate=evaluate, as_json=as_json, resume=resume)
    finally:
        if prepared.workers is not None:
            prepared.workers.group.close()


def _lead(pm: Any, orchestrator: Any, prepared: Any, *, evaluate: bool, as_json: bool, resume: Path | None) -> None:
    """Run with a progress bar, then print the report (the only process of a run, or its leader)."""
    from tensafe.orchestrator import render_report

    config = prepared.config
    _announce(prepared)
    reporter = _ProgressReporter()
    reporter.step = prepared.step
    progress: Any = click.progressbar(
        length=config.training.steps - prepared.step,
        label="training",
        file=sys.stderr,
        show_pos=True,
        item_show_func=lambda _: _describe(reporter.last),
    )
    with progress as bar:
        reporter.bar = bar
        pm.register(reporter)
        try:
            report = orchestrator.run(evaluate=evaluate, prepared=prepared, run_dir=resume, resume=resume is not None)
        finally:
            pm.unregister(reporter)
    if as_json:
        emit_json(report)
    else:
        click.echo(render_report(report), nl=False)
        click.echo(f"  report: {Path(report['run_dir']) / 'report.json'}")


def _announce(run: Any) -> None:
    """Say on stderr what a run is about to do: its privacy plan, and settings that defeat it."""
    cfg, privacy = run.config, run.privacy
    n = len(run.train_data)
    if run.workers is not None:
        size = run.workers.group.world_size
        click.echo(
            f"{size} worker{'s' if size > 1 else ''}: each Poisson-samples its 1/{size} of the records; "
            "the noise is added once to their summed gradients",
            err=True,
        )
    if privacy is None:
        click.echo(f"training without differential privacy: {cfg.training.steps} steps on {n} records", err=True)
        return
    budget = f"target epsilon {privacy.target_epsilon:g}" if privacy.target_epsilon is not None else "no budget"
    click.echo(
        f"DP-SGD: noise multiplier {cfg.dp.noise_multiplier:.4g}, clip {cfg.dp.max_grad_norm:g}, "
        f"q = {cfg.training.batch_size}/{n} = {privacy.sampling_rate:.4g}, {cfg.training.steps} steps planned, "
        f"{budget} at delta {privacy.delta:.3g} ({privacy.accountant_name})",
        err=True,
    )
    if not privacy.secure_rng:
        click.echo("warning: dp.secure_rng is false: the noise is seeded, reproducible and NOT private", err=True)
    if privacy.sampling_rate >= 1.0:
        click.echo(
            f"warning: training.batch_size ({cfg.training.batch_size}) >= records ({n}): every step uses every "
            "record (q = 1), so sampling gives no privacy amplification; lower training.batch_size or add records",
            err=True,
        )
    if privacy.target_epsilon is not None and cfg.dp.noise_multiplier >= 10:
        click.echo(
            f"warning: reaching epsilon {privacy.target_epsilon:g} in {cfg.training.steps} steps on {n} records "
            f"needs a noise multiplier of {cfg.dp.noise_multiplier:.3g}, which drowns the gradient; use more "
            "records, a smaller training.batch_size, fewer steps or a larger dp.target_epsilon",
            err=True,
        )


def _training_options(func: Any) -> Any:
    func = click.option("--json", "as_json", is_flag=True, help="Print the run report as JSON.")(func)
    func = click.option("--run-name", help="Name of the run directory (default: timestamped).")(func)
    func = click.option("--output-dir", type=click.Path(path_type=Path), help="Where run directories go.")(func)
    func = click.option(
        "--steps",
        type=click.IntRange(min=1),
        help="Total optimizer steps (overrides training.steps). Under DP the noise is calibrated to spend the "
        "budget in exactly these steps: a 5-step smoke test trains at far less noise than a 300-step run.",
    )(func)
    func = click.option(
        "--data", type=click.Path(path_type=Path, dir_okay=False), help="JSONL training data (overrides data.path)."
    )(func)
    func = click.option("--model", help="Base model: a local directory or hub id (overrides model.path).")(func)
    func = click.option(
        "--resume",
        type=click.Path(path_type=Path, file_okay=False),
        metavar="RUN_DIR",
        help="Continue the run in RUN_DIR from its last checkpoint (same config), up to --steps.",
    )(func)
    return CONFIG_ARG(func)


def _training_command(name: str, *, evaluate: bool, help_text: str) -> click.Command:
    """``tensafe run`` and ``tensafe train``: one pipeline, with or without before/after evaluation."""

    @click.pass_context
    def command(
        ctx: click.Context,
        config_file: Path | None,
        steps: int | None,
        output_dir: Path | None,
        run_name: str | None,
        as_json: bool,
        resume: Path | None,
        data: Path | None,
        model: str | None,
        nproc_per_node: int | None,
        nnodes: int,
        rdzv_endpoint: str | None,
        rdzv_id: str,
    ) -> None:
        launch = None
        if nproc_per_node is not None:
            forward = [str(config_file)] if config_file is not None else []
            given: list[tuple[str, object]] = [
                ("--steps", steps),
                ("--output-dir", output_dir),
                ("--data", data),
                ("--model", model),
                ("--resume", resume),
            ]
            forward += [str(part) for flag, value in given if value is not None for part in (flag, value)]
            forward += ["--json"] if as_json else []
            launch = Launch(name, nproc_per_node, nnodes, rdzv_endpoint, rdzv_id, forward)
        elif nnodes != 1 or rdzv_endpoint is not None:
            raise UsageError("--nnodes and --rdzv-endpoint go with --nproc-per-node")
        _train(
            ctx,
            config_file,
            evaluate=evaluate,
            as_json=as_json,
            resume=resume,
            launch=launch,
            **{
                "training.steps": steps,
                "output_dir": output_dir,
                "run_name": run_name,
                "data.path": data.resolve() if data is not None else None,
                "model.path": model,
            },
        )

    command.__doc__ = help_text
    return click.command(name)(launch_options(_training_options(command)))


run_cmd = _training_command(
    "run",
    evaluate=True,
    help_text="""Run the whole pipeline: train a LoRA adapter with DP-SGD, measure held-out
    loss and sample completions before and after, and write the adapter and a
    report to a run directory.

    With no CONFIG, trains the ML backend's embedded tiny model on its embedded
    dataset (no network). CONFIG is a YAML, TOML or JSON file; see
    `tensafe config show` for every setting. With `mode: rlvr` in CONFIG it
    runs reinforcement learning with verifiable rewards and reports the
    held-out reward instead of the loss.
    """,
)
train_cmd = _training_command(
    "train",
    evaluate=False,
    help_text="""Train only: DP-SGD on Poisson-sampled batches, then write the adapter,
    the training state and the report (no before/after evaluation).""",
)
