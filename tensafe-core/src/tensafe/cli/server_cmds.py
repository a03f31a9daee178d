"""The server's commands: serve, keys, audit, db."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from tensafe.cli.commands import emit_json
from tensafe.cli.context import plugin_manager
from tensafe.errors import UsageError

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
@click.option(
    "--he-mask-workers",
    type=click.IntRange(min=0, max=64),
    default=None,
    envvar="TENSAFE_HE_MASK_WORKERS",
    help="HE inference: worker processes per session that encrypt masks ahead of time, off the token's "
    "critical path (default 0: masks are made inline). Give them cores of their own.",
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
    he_mask_workers: int | None,
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
        app = create_app(service, quotas=quotas, he_mask_workers=he_mask_workers)
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
            emit_json(list_keys(db))
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
        emit_json({name: r.model_dump() for name, r in results.items()})
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
