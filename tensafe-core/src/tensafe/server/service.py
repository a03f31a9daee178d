"""The session service: tenants' training and inference sessions over the orchestrator, persisted.

Each session runs its operations one at a time, in submission order, on its
own worker thread. An optimizer step's result, the session state it produced
(encrypted on disk) and its privacy spend are committed to the database in one
transaction before the step's future reports completion, so a client is never
told of a step or an epsilon that a crash could undo. After a restart, queued
or running operations are reported failed and retryable.

Under DP, what the server keeps about a step beyond the result it owes the
caller (session metadata, the audit chain) holds no statistic of the caller's
batch: the audit record of a step covers its step number and epsilon, and the
batch itself only through a digest keyed with the audit key.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from tensafe.api import (
    DatasetInfo,
    ErrorInfo,
    ExportedPackage,
    ExportRequest,
    FutureInfo,
    LoadStateRequest,
    ModelInfo,
    PrivacySpent,
    RemoteInferenceSessionCreate,
    RemoteTrainingSessionCreate,
    SampleRequest,
    SampleResult,
    SavedState,
    SaveStateRequest,
    SessionInfo,
    TrainingSessionCreate,
)
from tensafe.errors import NotFound, OperationFailed
from tensafe.plugins import TensafePluginManager, create_plugin_manager
from tensafe.server import audit
from tensafe.server.audit_chains import AuditChains
from tensafe.server.crypto import (
    KeyRing,
    load_master_key,
    open_meta,
    open_text,
    seal_text,
    sign_meta,
)
from tensafe.server.db import DB_FILE, ArtifactRow, FutureRow, SessionRow, Tenant, database_url, open_database
from tensafe.server.handoff import Handoff
from tensafe.server.inference_sessions import InferenceSessions
from tensafe.server.models import ModelRegistry
from tensafe.server.operations import SYNCHRONOUS
from tensafe.server.queued import QUEUED_REQUESTS, _audited, _error, _new_id, new_future
from tensafe.server.receipts import ReceiptSigner
from tensafe.server.recovery import recover, recover_session
from tensafe.server.replicas import LEASE_SECONDS, Leases
from tensafe.server.session_store import SQLSessionStore
from tensafe.server.storage import ArtifactStore
from tensafe.server.tenant_keys import TenantKeyring, scratch_dir
from tensafe.server.uploads import parse_dataset
from tensafe.server.waits import FutureWaits
from tensafe.session_manager import LoadedSession, Queued, SessionManager, execute, operation_name
from tensafe.sessions import TrainingSessionCore

#: How long one status request may wait for a future to finish.
MAX_WAIT_S = 30.0
#: Queued operations one session may hold before new ones are refused (429).
MAX_PENDING = 256


class SessionService:
    """Everything the HTTP API does, callable without HTTP."""

    def __init__(
        self,
        data_dir: Path,
        *,
        database: str | None = None,
        plugin_manager: TensafePluginManager | None = None,
        master_key_file: Path | None = None,
        models: ModelRegistry | None = None,
        trusted_signers: Sequence[Path] = (),
        lease_seconds: float = LEASE_SECONDS,
    ) -> None:
        self.data_dir = data_dir
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        data_dir.chmod(0o700)
        self.keyring = KeyRing(load_master_key(data_dir, master_key_file))
        if database is None:  # SQLite gives its WAL and journal files the database file's mode
            os.close(os.open(data_dir / DB_FILE, os.O_WRONLY | os.O_CREAT, 0o600))
        self.store = ArtifactStore(data_dir / "artifacts", shared_database=database is not None)
        self.engine, self._sessions = open_database(database_url(database, data_dir))
        self.heads = audit.HeadFile(data_dir, self.keyring.head_key)
        self.receipts = ReceiptSigner(self.keyring.receipt_seed)
        self.pm = plugin_manager if plugin_manager is not None else create_plugin_manager()
        #: Commits of training sessions, fenced by leases; the manager of the sessions loaded here runs over it.
        self.session_store = SQLSessionStore(self)
        self.sessions: SessionManager[Session] = SessionManager(self.session_store)
        #: The futures still running here, and the long polls waiting for them.
        self.waits = FutureWaits()
        self._tenant_keys: dict[str, bytes] = {}
        self.models = models if models is not None else ModelRegistry.embedded()
        self.scratch = scratch_dir(data_dir)
        self.tgsp = TenantKeyring(self, self.scratch, trusted_signers)
        #: Each tenant's audit chain: its records, verification and signed receipts.
        self.chains = AuditChains(self)
        self.inference = InferenceSessions(self)
        self.leases = Leases(lease_seconds, exclusive=database is None)
        self.handoff = Handoff(self)

    def close(self) -> None:
        self.handoff.stop()
        self.sessions.close()
        with contextlib.suppress(Exception), self.db() as db:  # a database already gone has nothing to release
            self.leases.release(db)
        self.engine.dispose()

    @contextmanager
    def db(self) -> Iterator[Session]:
        """A transaction: committed on success, rolled back on any error.

        The audit heads it moved are written outside the database after the commit.
        """
        with self._sessions() as session:
            with session.begin():
                yield session
            heads = session.info.pop(audit.PENDING_HEADS, None)
        if heads:
            self.heads.advance(heads)

    # -- startup ----------------------------------------------------------------

    def start_replica(self) -> None:
        """Take work other replicas hand this one, and keep its leases (``tensafe serve``, after :meth:`recover`)."""
        self.handoff.start()

    def recover(self) -> int:
        """Report work that a previous process accepted but never finished as failed (see
        :func:`tensafe.server.recovery.recover`); called by ``tensafe serve`` at start."""
        return recover(self)

    # -- helpers ----------------------------------------------------------------

    def tenant_key(self, db: Session, tenant_id: str) -> bytes:
        if tenant_id not in self._tenant_keys:
            tenant = db.get(Tenant, tenant_id)
            if tenant is None:
                raise NotFound("no such tenant")
            self._tenant_keys[tenant_id] = self.keyring.tenant_key(tenant_id, tenant.wrapped_key)
        return self._tenant_keys[tenant_id]

    def _row(self, db: Session, tenant_id: str, session_id: str, kind: str | None = None) -> SessionRow:
        """The tenant's session: another tenant's id is looked up, and answered, exactly as an absent one."""
        query = select(SessionRow).where(SessionRow.id == session_id, SessionRow.tenant_id == tenant_id)
        row = db.execute(query).scalar_one_or_none()
        if row is None or (kind is not None and row.kind != kind):
            raise NotFound(f"no {kind or ''} session {session_id}".replace("  ", " "))
        return row

    def store_artifact(
        self, db: Session, tenant_id: str, kind: str, data: bytes, name: str = "", meta: dict[str, Any] | None = None
    ) -> str:
        artifact_id = _new_id()
        sha = self.store.write(db, kind, tenant_id, artifact_id, self.tenant_key(db, tenant_id), data)
        db.add(
            ArtifactRow(
                id=artifact_id,
                tenant_id=tenant_id,
                kind=kind,
                name=name,
                sha256=sha,
                size=len(data),
                meta=sign_meta(self.keyring.meta_key, f"{tenant_id}/{artifact_id}", meta or {}),
                created=time.time(),
            )
        )
        return artifact_id

    def _artifact(self, db: Session, tenant_id: str, artifact_id: str, kind: str) -> tuple[ArtifactRow, bytes]:
        """The tenant's artifact and its contents; another tenant's id is looked up as an absent one."""
        query = select(ArtifactRow).where(
            ArtifactRow.id == artifact_id, ArtifactRow.tenant_id == tenant_id, ArtifactRow.kind == kind
        )
        row = db.execute(query).scalar_one_or_none()
        if row is None:
            raise NotFound(f"no {kind} {artifact_id}")
        return row, self.store.read(db, tenant_id, artifact_id, self.tenant_key(db, tenant_id))

    def _live_session(self, tenant_id: str, session_id: str, kind: str) -> LoadedSession | None:
        """The tenant's session as loaded in this process, rebuilt from its last committed state if need be;
        None for a training session whose lease another live replica holds (hand it the work instead).

        The database says whether the tenant has the session before the map of
        loaded sessions is consulted: another tenant's session, loaded or not,
        takes the same path, and the same time, as an id that does not exist.
        """
        with self.db() as db:
            self._row(db, tenant_id, session_id, kind)
        live = self.sessions.loaded.get(session_id)
        if kind == "inference":
            if live is None:
                with self.sessions.loading:
                    live = self.sessions.loaded.get(session_id)
                    if live is None:
                        with self.db() as db:
                            core = self._rebuild(db, self._row(db, tenant_id, session_id))
                        live = self.sessions.add(session_id, LoadedSession(tenant_id, kind, core))
            return live
        token = self.leases.token(session_id)
        if live is not None and not live.evicted and token is not None and live.token == token:
            return live
        with self.sessions.loading:
            with self.db() as db:
                grant = self.leases.acquire(db, session_id)
                if grant is None:
                    return None
                if grant.taken_over:
                    recover_session(self, db, session_id)
            live = self.sessions.loaded.get(session_id)
            if live is not None and not live.evicted and live.token == grant.token:
                return live
            if live is not None:
                self.sessions.evict(session_id, live)
            with self.db() as db:
                row = self._row(db, tenant_id, session_id, kind)
                loaded = LoadedSession(
                    tenant_id, kind, self._rebuild(db, row), token=grant.token, committed_step=row.step
                )
            return self.sessions.add(session_id, loaded)

    def holder(self, tenant_id: str, session_id: str) -> LoadedSession | None:
        """The training session if this replica runs it (taking it over if its lease expired), else None."""
        return self._live_session(tenant_id, session_id, "training")

    def drop(self, session_id: str) -> None:
        """Forget a session whose lease this replica lost."""
        self.sessions.evict(session_id)

    new_id = staticmethod(_new_id)

    def _rebuild(self, db: Session, row: SessionRow) -> Any:
        """A session's core from its stored spec and its last committed state."""
        if row.kind == "inference":
            spec = RemoteInferenceSessionCreate.model_validate_json(row.spec)
            return self.inference.core(db, row.tenant_id, row.id, spec)
        core = self._training_core(db, row.tenant_id, row.id, RemoteTrainingSessionCreate.model_validate_json(row.spec))
        if row.state_artifact is not None:
            _, state = self._artifact(db, row.tenant_id, row.state_artifact, "session")
            core.restore(state, self._session_meta(row), keep_higher_spend=False)
        return core

    def _session_meta(self, row: SessionRow) -> dict[str, Any]:
        """A training session's step and spend as committed with its state, refused if edited since."""
        if row.state_artifact is None:
            return {}
        return open_meta(self.keyring.meta_key, f"{row.tenant_id}/{row.state_artifact}", row.meta)

    def _info(self, row: SessionRow) -> SessionInfo:
        meta = self._session_meta(row)
        spent = meta.get("spent")
        live = self.sessions.loaded.get(row.id)
        return SessionInfo(
            session_id=row.id,
            kind=row.kind,
            step=meta.get("step", row.step),
            privacy=PrivacySpent.model_validate(spent) if spent else None,
            pending=live.pending if live is not None else 0,
            created=row.created,
        )

    # -- training sessions -----------------------------------------------------------

    def models_listing(self) -> list[ModelInfo]:
        return self.models.listing()

    def _training_core(
        self, db: Session, tenant_id: str, session_id: str, spec: RemoteTrainingSessionCreate
    ) -> TrainingSessionCore:
        """A session's core: the registered model, and the tenant's dataset when the server samples."""
        config = self.models.run_config(spec.config, self.scratch)
        local = TrainingSessionCreate(config=config, sampling_rate=spec.sampling_rate, dataset_size=spec.dataset_size)
        dataset = None
        if spec.dataset_id is not None:
            dataset = parse_dataset(self._artifact(db, tenant_id, spec.dataset_id, "dataset")[1])
        return TrainingSessionCore(local, session_id, plugin_manager=self.pm, dataset=dataset)

    def create_training(self, tenant_id: str, spec: RemoteTrainingSessionCreate) -> SessionInfo:
        session_id = _new_id()
        with self.db() as db:
            core = self._training_core(db, tenant_id, session_id, spec)
        with self.db() as db:
            row = SessionRow(
                id=session_id, tenant_id=tenant_id, kind="training", spec=spec.model_dump_json(), created=time.time()
            )
            db.add(row)
            db.flush()
            grant = self.leases.acquire(db, session_id)
            assert grant is not None  # a new session's lease is free
            live = LoadedSession(tenant_id, "training", core, token=grant.token)
            self.session_store.commit(db, session_id, live, state_changed=True)
            audit.append(
                db,
                self.keyring.audit_key,
                tenant_id,
                "training.create",
                session_id,
                spec.model_dump(mode="json"),
                {"step": 0},
                core.epsilon(),
            )
        self.sessions.add(session_id, live)
        return self._info(row)

    def list_sessions(self, tenant_id: str) -> list[SessionInfo]:
        with self.db() as db:
            rows = db.execute(
                select(SessionRow).where(SessionRow.tenant_id == tenant_id).order_by(SessionRow.created)
            ).scalars()
            return [self._info(row) for row in rows]

    def info(self, tenant_id: str, session_id: str) -> SessionInfo:
        with self.db() as db:
            return self._info(self._row(db, tenant_id, session_id))

    def submit(
        self,
        tenant_id: str,
        session_id: str,
        request: Queued,
        request_key: str | None = None,
        *,
        defer: bool = False,
    ) -> FutureInfo:
        """Queue forward_backward, optim_step or train_step; a repeated ``request_key`` returns the first one.

        With ``defer`` the operation is accepted (and committed) but handed to
        the session's worker only at :meth:`start_session` (or the next
        submission's start): the HTTP API answers first, so the session's
        computation does not hold up the reply that it was queued.
        """
        operation = operation_name(request)
        live = self._live_session(tenant_id, session_id, "training")
        with self.db() as db:
            if request_key is not None:
                existing = db.execute(
                    select(FutureRow).where(FutureRow.tenant_id == tenant_id, FutureRow.request_key == request_key)
                ).scalar_one_or_none()
                if existing is not None:
                    return self._future_info(existing, self.tenant_key(db, tenant_id))
            if live is None:  # another replica runs the session: hand it the work
                db.rollback()
        if live is None:
            return self._future_info(self.handoff.forward(tenant_id, session_id, operation, request, request_key), b"")
        with self.db() as db:
            if live.pending >= MAX_PENDING:
                raise OperationFailed(
                    f"session {session_id} has {live.pending} operations queued", code="too_busy", retryable=True
                )
            future = new_future(tenant_id, session_id, operation, request_key)
            db.add(future)
        self.waits.started(future.id)
        live.pending += 1
        with live.lock:
            live.unstarted.append(lambda: self._run(live, session_id, future.id, request))
        if not defer:
            live.start()
        return self._future_info(future, b"")

    def start_session(self, session_id: str) -> None:
        """Start the operations :meth:`submit` accepted with ``defer``."""
        live = self.sessions.loaded.get(session_id)
        if live is not None:
            live.start()

    def _run(self, live: LoadedSession, session_id: str, future_id: str, request: Queued) -> None:
        """Run a queued operation on the session's worker; commit it with its future row and audit record."""
        core: TrainingSessionCore = live.core
        outcome: FutureInfo | None = None
        operation = operation_name(request)
        before = core.step

        def record(db: Session, result: dict[str, Any]) -> None:
            sealed = self.seal_result(db, future_id, live.tenant_id, result)
            db.execute(
                update(FutureRow)
                .where(FutureRow.id == future_id)
                .values(status="completed", result=sealed, after_step=before)
            )
            audited_request, audited_result = _audited(core, request, result, self.keyring.audit_key)
            audit.append(
                db,
                self.keyring.audit_key,
                live.tenant_id,
                operation,
                session_id,
                audited_request,
                audited_result,
                core.epsilon(),
            )

        try:
            try:
                result = self.sessions.run(session_id, live, operation, lambda: execute(core, request), record)
            except Exception as exc:
                outcome = self._failed(future_id, session_id, operation, exc, before)
                return
            outcome = FutureInfo(
                future_id=future_id, session_id=session_id, operation=operation, status="completed", result=result
            )
        finally:
            live.pending -= 1
            # Waiters get the committed outcome as it is, without reading it back from the database.
            self.waits.finished(future_id, outcome)

    def _failed(self, future_id: str, session_id: str, operation: str, exc: BaseException, before: int) -> FutureInfo:
        error = self.mark_failed(future_id, exc, before)
        return FutureInfo(
            future_id=future_id,
            session_id=session_id,
            operation=operation,
            status="failed",
            error=error,
        )

    def mark_failed(self, future_id: str, exc: BaseException, before: int) -> ErrorInfo:
        """Record an operation's failure on its future row."""
        error = _error(exc)
        with self.db() as db:
            db.execute(
                update(FutureRow)
                .where(FutureRow.id == future_id)
                .values(status="failed", error=error.model_dump_json(), after_step=before)
            )
        return error

    def seal_result(self, db: Session, future_id: str, tenant_id: str, result: dict[str, Any]) -> str:
        """A result as the database keeps it: encrypted under the tenant's key (it holds per-datum logprobs)."""
        return seal_text(self.tenant_key(db, tenant_id), json.dumps(result), f"future:{tenant_id}/{future_id}")

    def _future_info(self, row: FutureRow, key: bytes) -> FutureInfo:
        """The future as the client sees it; ``key`` is the tenant's, to open a result."""
        result = None
        if row.result:
            result = json.loads(open_text(key, row.result, f"future:{row.tenant_id}/{row.id}"))
        return FutureInfo(
            future_id=row.id,
            session_id=row.session_id,
            operation=row.operation,
            status=row.status,
            result=result,
            error=ErrorInfo.model_validate_json(row.error) if row.error else None,
        )

    def future(self, tenant_id: str, future_id: str) -> FutureInfo:
        """The tenant's future as it stands; another tenant's id is looked up as an absent one."""
        with self.db() as db:
            query = select(FutureRow).where(
                FutureRow.id == future_id,
                FutureRow.tenant_id == tenant_id,
                FutureRow.operation.in_(QUEUED_REQUESTS),  # not the rows of calls handed between replicas
            )
            row = db.execute(query).scalar_one_or_none()
            if row is None:
                raise NotFound(f"no future {future_id}")
            return self._future_info(row, self.tenant_key(db, tenant_id))

    async def wait_future(self, tenant_id: str, future_id: str, wait: float) -> FutureInfo:
        """The future once it finishes or ``wait`` seconds (at most MAX_WAIT_S) pass, waiting on the event loop."""
        return await self.waits.status(tenant_id, min(wait, MAX_WAIT_S), lambda: self.future(tenant_id, future_id))

    def sample(self, tenant_id: str, session_id: str, request: SampleRequest) -> SampleResult:
        result: SampleResult = self._call(tenant_id, session_id, "sample", request)
        return result

    def save_state(self, tenant_id: str, session_id: str, name: str | None = None) -> SavedState:
        saved: SavedState = self._call(tenant_id, session_id, "save_state", SaveStateRequest(name=name))
        return saved

    def load_state(self, tenant_id: str, session_id: str, state_id: str) -> SessionInfo:
        info: SessionInfo = self._call(tenant_id, session_id, "load_state", LoadStateRequest(state_id=state_id))
        return info

    def export_tgsp(self, tenant_id: str, session_id: str, request: ExportRequest) -> ExportedPackage:
        """Sign the adapter with the tenant's key; encrypt it to the tenant's key and ``request.recipients``."""
        exported: ExportedPackage = self._call(tenant_id, session_id, "export_tgsp", request)
        return exported

    def _call(self, tenant_id: str, session_id: str, operation: str, request: BaseModel) -> Any:
        """A synchronous operation on a training session: here if this replica runs it, else by its holder."""
        live = self._live_session(tenant_id, session_id, "training")
        if live is None:
            return self.handoff.call(tenant_id, session_id, operation, request)
        handler = SYNCHRONOUS[operation][2]
        return self.sessions.call(live, lambda: handler(self, live, session_id, request))

    def upload_dataset(self, tenant_id: str, data: bytes, name: str = "") -> DatasetInfo:
        """Store a JSONL dataset, sealed under the tenant key, for sessions the server samples."""
        records = parse_dataset(data)
        with self.db() as db:
            dataset_id = self.store_artifact(db, tenant_id, "dataset", data, name, {"records": len(records)})
            audit.append(
                db,
                self.keyring.audit_key,
                tenant_id,
                "dataset.upload",
                dataset_id,
                {"name": name},
                {"records": len(records)},
            )
        return DatasetInfo(dataset_id=dataset_id, records=len(records), name=name)
