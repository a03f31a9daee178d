"""The core commands: plugins, run, train, inference, serve, keys, audit."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from tensafe.cli.context import plugin_manager
from tensafe.errors import UsageError
from tensafe.hookspecs import hookimpl

CONFIG_ARG = click.argument("config_file", metavar="[CONFIG]", required=False, type=click.Path(path_type=Path))


def _load(config_file: Path | None, **overrides: Any) -> Any:
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


def _emit_json(data: Any) -> None:
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
    _emit_json(plugin_listing(plugin_manager(ctx), include_builtin=include_builtin, hook=hook))


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


def _train(
    ctx: click.Context,
    config_file: Path | None,
    *,
    evaluate: bool,
    as_json: bool,
    resume: Path | None,
    **overrides: Any,
) -> None:
    from tensafe.orchestrator import TenSafeOrchestrator, render_report

    config = _load(config_file, **overrides)
    pm = plugin_manager(ctx)
    orchestrator = TenSafeOrchestrator(config, plugin_manager=pm)
    if resume is not None and not (resume / "checkpoint").is_dir():
        raise UsageError(f"--resume {resume}: no checkpoint there (expected {resume / 'checkpoint'})")
    prepared = orchestrator.prepare(resume_from=resume)
    if resume is not None:
        orchestrator.load_checkpoint(prepared, resume / "checkpoint")
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
        _emit_json(report)
    else:
        click.echo(render_report(report), nl=False)
        click.echo(f"  report: {Path(report['run_dir']) / 'report.json'}")


def _announce(run: Any) -> None:
    """Say on stderr what a run is about to do: its privacy plan, and settings that defeat it."""
    cfg, privacy = run.config, run.privacy
    n = len(run.train_data)
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
    ) -> None:
        _train(
            ctx,
            config_file,
            evaluate=evaluate,
            as_json=as_json,
            resume=resume,
            **{
                "training.steps": steps,
                "output_dir": output_dir,
                "run_name": run_name,
                "data.path": data.resolve() if data is not None else None,
                "model.path": model,
            },
        )

    command.__doc__ = help_text
    return click.command(name)(_training_options(command))


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


# -- inference ----------------------------------------------------------------


@click.command("inference")
@CONFIG_ARG
@click.option("-p", "--prompt", "prompts", multiple=True, required=True, help="Prompt text (repeatable).")
@click.option(
    "--adapter", type=click.Path(path_type=Path), help="A run's adapter directory, or a signed .tgsp package."
)
@click.option("--recipient-key", type=click.Path(path_type=Path), help="Your private recipient key (.tgsp only).")
@click.option(
    "--trusted",
    "trusted",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Public key of a signer you trust (.tgsp only; repeatable).",
)
@click.option(
    "--insecure-allow-untrusted-signer",
    "allow_untrusted",
    is_flag=True,
    help="Open a .tgsp package signed by a key you do NOT trust. Anyone could have made it.",
)
@click.option("--model", help="Base model: a local directory or hub id (overrides model.path).")
@click.option("--max-tokens", type=int, help="Most tokens to generate.")
@click.option("--temperature", type=float, help="0 = greedy.")
@click.option("--top-p", type=float, help="Nucleus sampling mass.")
@click.option("--top-k", type=int, help="Keep the k most likely tokens (-1 = all).")
@click.option("--seed", type=int, help="Seed for reproducible sampling.")
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option(
    "-n", "--num-samples", default=1, show_default=True, type=click.IntRange(1, 64), help="Samples per prompt."
)
@click.option("--json", "as_json", is_flag=True, help="Print tokens, logprobs and stop reasons as JSON.")
@click.option(
    "--he",
    "he",
    is_flag=True,
    help="Compute the adapter's LoRA products under homomorphic encryption (HE-LoRA; needs an HE backend "
    "such as tensafe-he-seal's 'seal-ckks', configured by the he section).",
)
@click.pass_context
def inference_cmd(
    ctx: click.Context,
    config_file: Path | None,
    prompts: tuple[str, ...],
    adapter: Path | None,
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    seed: int | None,
    stop: tuple[str, ...],
    num_samples: int,
    as_json: bool,
    recipient_key: Path | None,
    trusted: tuple[Path, ...],
    allow_untrusted: bool,
    he: bool,
    model: str | None,
) -> None:
    """Generate text from a base model, with or without a trained adapter.

    The model and backend come from CONFIG (default: the embedded model).
    """
    from tensafe.orchestrator import TenSafeOrchestrator

    config = _load(
        config_file,
        **{
            "sampling.max_tokens": max_tokens,
            "sampling.temperature": temperature,
            "sampling.top_p": top_p,
            "sampling.top_k": top_k,
            "sampling.seed": seed,
            "sampling.stop": list(stop) or None,
            "tgsp.recipient_key": recipient_key,
            "tgsp.trusted_signers": list(trusted) or None,
            "model.path": model,
        },
    )
    orchestrator = TenSafeOrchestrator(config, plugin_manager=plugin_manager(ctx))
    if allow_untrusted:
        click.echo(
            "WARNING: --insecure-allow-untrusted-signer: the package's signer is NOT verified as "
            "anyone you trust; its contents could come from anyone.",
            err=True,
        )
        orchestrator.allow_untrusted_signer = True
    if not as_json and num_samples == 1:
        for prompt in prompts:
            pieces = orchestrator.stream(prompt, adapter=adapter, he=he)
            click.echo(prompt, nl=False)
            for piece in pieces:
                click.echo(piece, nl=False)
            click.echo()
        return
    responses = orchestrator.generate(list(prompts), adapter=adapter, num_samples=num_samples, he=he)
    if as_json:
        _emit_json([r.model_dump() for r in responses])
        return
    for prompt, response in zip(prompts, responses, strict=True):
        for seq in response.sequences:
            click.echo(f"{prompt}{seq.text}")
            click.echo(f"  [{len(seq.tokens)} tokens, stop: {seq.stop_reason}]", err=True)


# -- serving ------------------------------------------------------------------


DATA_DIR_OPTION = click.option(
    "--data-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("tensafe-data"),
    show_default=True,
    envvar="TENSAFE_DATA_DIR",
    help="Where the server keeps its database (SQLite), master key and encrypted artifacts.",
)
DATABASE_OPTION = click.option(
    "--database",
    metavar="URL",
    envvar="TENSAFE_DATABASE_URL",
    help="SQLAlchemy URL, e.g. postgresql://user:pw@host/db (default: SQLite in the data directory).",
)
MASTER_KEY_FILE_OPTION = click.option(
    "--master-key-file",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="TENSAFE_MASTER_KEY_FILE",
    help="The master key's file, kept apart from the data (default: master.key in the data directory).",
)


def _service(
    ctx: click.Context,
    data_dir: Path,
    database: str | None,
    master_key_file: Path | None,
    *,
    create: bool = False,
    **options: Any,
) -> Any:
    """The server's state in ``data_dir``; only ``create`` (serve, keys create) may start a new one.

    A new data directory gets a new master key, so reading one that does not
    exist (a mistyped path) would silently find nothing: that is refused.
    """
    if not create and not data_dir.is_dir():
        raise UsageError(f"no TenSafe server data in {data_dir}; pass --data-dir (or create a key first)")
    from tensafe.server import require

    require("sqlalchemy")
    require("cryptography")
    from tensafe.server.service import SessionService

    return SessionService(
        data_dir, database=database, plugin_manager=plugin_manager(ctx), master_key_file=master_key_file, **options
    )


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8700, show_default=True, type=int, help="Port to listen on.")
@click.option(
    "--model",
    "models",
    multiple=True,
    metavar="NAME=PATH",
    help="Serve the model in local directory PATH as NAME (repeat for more; the first is the default). "
    "Without any, the ML backend's embedded model is served as 'embedded'.",
)
@click.option(
    "--trusted-signer",
    "trusted_signers",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A TGSP signing public key whose packages tenants may upload and serve (repeatable); "
    "each tenant's own server-held signing key is always trusted for that tenant.",
)
@click.option(
    "--lease-seconds",
    type=click.FloatRange(min=1.0, max=3600.0),
    default=10.0,
    show_default=True,
    help="Replicas on one PostgreSQL database: how long a replica's hold on a session lasts without renewal; "
    "a dead replica's sessions move to another after this.",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="Log lines as text or as JSON objects; each line of a request carries its request id (X-Request-ID).",
)
@click.option(
    "--max-sessions",
    type=click.IntRange(min=0),
    default=1000,
    show_default=True,
    help="Most sessions a tenant may hold (0: unlimited); past it, creating one is 429 quota_exceeded.",
)
@click.option(
    "--max-queued",
    type=click.IntRange(min=0),
    default=1000,
    show_default=True,
    help="Most operations a tenant may have queued or running (0: unlimited); past it, 429 with Retry-After.",
)
@click.option(
    "--max-upload-bytes",
    type=click.IntRange(min=0),
    default=64 * 1024**3,
    show_default=True,
    help="Most bytes a tenant's datasets and TGSP packages may hold (0: unlimited); an upload past it is 413.",
)
@DATA_DIR_OPTION
@DATABASE_OPTION
@MASTER_KEY_FILE_OPTION
@click.pass_context
def serve_cmd(
    ctx: click.Context,
    host: str,
    port: int,
    models: tuple[str, ...],
    trusted_signers: tuple[Path, ...],
    lease_seconds: float,
    log_format: str,
    max_sessions: int,
    max_queued: int,
    max_upload_bytes: int,
    data_dir: Path,
    database: str | None,
    master_key_file: Path | None,
) -> None:
    """Serve the training and inference HTTP API (/api/v1/training, /api/v1/inference, /docs).

    Several replicas may serve one PostgreSQL database (--database, the same
    master key, each its own --data-dir): any replica accepts any request,
    and each training session runs on one replica at a time.

    Tenants name models by the names given here, never by path, and never
    name a key file: packages are signed and opened with keys the server
    holds per tenant. Needs the server extra (python -m pip install
    './tensafe-core[server]') and an ML backend (tensafe-torch). Create API
    keys with `tensafe keys create`.

    \b
    Example:
      tensafe serve --model llama-8b=/models/llama-3-8b --data-dir /srv/tensafe
    """
    from tensafe.config import RunConfig
    from tensafe.server import require

    registry = plugin_manager(ctx).registry
    if not registry.registrations("ml_backend"):
        registry.registration("ml_backend", RunConfig().backend)  # raises, saying what to install
    for module in ("fastapi", "uvicorn", "alembic", "prometheus_client", "fastapi_offline"):
        require(module)
    import uvicorn

    from tensafe.server import logs
    from tensafe.server.app import create_app
    from tensafe.server.models import ModelRegistry
    from tensafe.server.quotas import Quotas

    registry_of_models = ModelRegistry.parse(models)
    logs.configure("json" if log_format == "json" else "text")
    quotas = Quotas(max_sessions=max_sessions, max_queued=max_queued, max_upload_bytes=max_upload_bytes)
    service = _service(
        ctx,
        data_dir,
        database,
        master_key_file,
        create=True,
        models=registry_of_models,
        trusted_signers=list(trusted_signers),
        lease_seconds=lease_seconds,
    )
    failed = service.recover()
    if failed:
        click.echo(f"{failed} operations from before a restart are reported failed (retryable)", err=True)
    service.start_replica()
    click.echo(f"tensafe serve: http://{host}:{port} (data in {data_dir})", err=True)
    try:
        # log_config=None: uvicorn's records go to the handler logs.configure installed, in the chosen format.
        app = create_app(service, quotas=quotas)
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, log_config=None)
    finally:
        service.close()


@click.group("keys")
def keys_cmd() -> None:
    """Create, list and revoke the server's API keys (one tenant per name)."""


@keys_cmd.command("create")
@click.argument("tenant")
@click.option("--label", default="", help="A note on what the key is for.")
@DATA_DIR_OPTION
@DATABASE_OPTION
@MASTER_KEY_FILE_OPTION
@click.pass_context
def keys_create(
    ctx: click.Context, tenant: str, label: str, data_dir: Path, database: str | None, master_key_file: Path | None
) -> None:
    """Create an API key for TENANT (created if new); the key is printed once, only its hash is kept.

    A new tenant also gets its TGSP signing and recipient keys, held by the
    server (encrypted under the tenant's key) when tensafe-tgsp is installed.
    """
    from tensafe.server.auth import create_key
    from tensafe.server.db import ApiKey

    service = _service(ctx, data_dir, database, master_key_file, create=True)
    try:
        with service.db() as db:
            key_id, key = create_key(db, service.keyring, tenant, label)
            tenant_id = db.get(ApiKey, key_id).tenant_id
        if service.pm.registry.registrations("tgsp_loader"):
            service.tgsp.ensure(tenant_id)
    finally:
        service.close()
    click.echo(f"key id {key_id} for tenant {tenant!r}; store this key now, it is not shown again:", err=True)
    click.echo(key)


@keys_cmd.command("list")
@DATA_DIR_OPTION
@DATABASE_OPTION
@MASTER_KEY_FILE_OPTION
@click.pass_context
def keys_list(ctx: click.Context, data_dir: Path, database: str | None, master_key_file: Path | None) -> None:
    """List API keys as JSON (ids, tenants, labels; never the keys)."""
    from tensafe.server.auth import list_keys

    service = _service(ctx, data_dir, database, master_key_file)
    try:
        with service.db() as db:
            _emit_json(list_keys(db))
    finally:
        service.close()


@keys_cmd.command("revoke")
@click.argument("key_id")
@DATA_DIR_OPTION
@DATABASE_OPTION
@MASTER_KEY_FILE_OPTION
@click.pass_context
def keys_revoke(
    ctx: click.Context, key_id: str, data_dir: Path, database: str | None, master_key_file: Path | None
) -> None:
    """Revoke the API key KEY_ID; requests with it get 401 from then on."""
    from tensafe.server.auth import revoke_key

    service = _service(ctx, data_dir, database, master_key_file)
    try:
        with service.db() as db:
            revoke_key(db, key_id)
    finally:
        service.close()
    click.echo(f"revoked {key_id}")


@click.group("audit")
def audit_cmd() -> None:
    """Inspect the server's per-tenant, hash-chained audit log."""


@audit_cmd.command("verify")
@DATA_DIR_OPTION
@DATABASE_OPTION
@MASTER_KEY_FILE_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the verification of each tenant as JSON.")
@click.option(
    "--receipt",
    "receipt_files",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A signed audit receipt a client kept (GET /api/v1/audit/receipt, TenSafeClient.audit_receipt); "
    "the chain must still hold the record it names. Repeatable.",
)
@click.pass_context
def audit_verify(
    ctx: click.Context,
    data_dir: Path,
    database: str | None,
    master_key_file: Path | None,
    as_json: bool,
    receipt_files: tuple[Path, ...],
) -> None:
    """Check every tenant's audit chain; exits 1 if any record was edited, deleted, reordered or cut.

    The chain and the head kept beside it catch changes made through the
    database. With --receipt, a cut made by rewriting the whole data
    directory (an old backup restored) is caught too: a receipt is signed
    with a key only the master key gives.
    """
    receipts = [_read_receipt(path) for path in receipt_files]
    service = _service(ctx, data_dir, database, master_key_file)
    try:
        results = service.chains.verify_all(receipts)
    finally:
        service.close()
    if as_json:
        _emit_json({name: r.model_dump() for name, r in results.items()})
    else:
        for name, result in results.items():
            click.echo(f"{name}: {'ok' if result.ok else 'BROKEN'} ({result.records} records)")
            for problem in result.problems:
                click.echo(f"  {problem}")
    if not all(r.ok for r in results.values()):
        ctx.exit(1)


def _read_receipt(path: Path) -> Any:
    from pydantic import ValidationError

    from tensafe.api import AuditReceipt

    try:
        return AuditReceipt.model_validate_json(path.read_bytes())
    except (OSError, ValidationError) as exc:
        raise UsageError(f"{path} is not a TenSafe audit receipt: {str(exc).splitlines()[0]}") from None


@click.group("db")
def db_cmd() -> None:
    """The server's database schema: its migration revision, and upgrading it (tensafe serve upgrades too)."""


def _open_schema(data_dir: Path, database: str | None, *, migrate: bool) -> Any:
    from tensafe.server import require

    require("sqlalchemy")
    require("alembic")
    from tensafe.server.db import database_url, open_database

    if database is None and not data_dir.is_dir():
        raise UsageError(f"no TenSafe server data in {data_dir}; pass --data-dir or --database")
    return open_database(database_url(database, data_dir), migrate=migrate)[0]


@db_cmd.command("upgrade")
@DATA_DIR_OPTION
@DATABASE_OPTION
def db_upgrade(data_dir: Path, database: str | None) -> None:
    """Bring the database to the newest schema revision (a database from before migrations is adopted first)."""
    from tensafe.server.migrate import current_revision

    engine = _open_schema(data_dir, database, migrate=True)
    try:
        click.echo(f"database at revision {current_revision(engine)} (head)")
    finally:
        engine.dispose()


@db_cmd.command("current")
@DATA_DIR_OPTION
@DATABASE_OPTION
def db_current(data_dir: Path, database: str | None) -> None:
    """Print the database's schema revision and the newest one; exit 1 when it is behind."""
    from tensafe.server.migrate import current_revision, head_revision

    engine = _open_schema(data_dir, database, migrate=False)
    try:
        current = current_revision(engine)
    finally:
        engine.dispose()
    head = head_revision()
    click.echo(f"current: {current or 'none (run tensafe db upgrade)'}")
    click.echo(f"head: {head}")
    if current != head:
        sys.exit(1)


CORE_COMMANDS = (plugins_cmd, run_cmd, train_cmd, inference_cmd, serve_cmd, keys_cmd, audit_cmd, db_cmd)
