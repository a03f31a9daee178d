"""A training session's synchronous operations, as the replica holding the session runs them.

Each takes the session's loaded copy (on its worker thread, in the order the
session's operations were submitted) and a request model, and returns a
response model, so that the operation can run here or be handed, as JSON, to
the replica that holds the session (:mod:`tensafe.server.handoff`). Each runs
through the session manager (:meth:`tensafe.session_manager.SessionManager.run`):
its database writes commit only while this copy may still write, and a copy
that changed but could not commit is evicted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from tensafe.api import (
    ExportedPackage,
    ExportRequest,
    LoadStateRequest,
    SampleRequest,
    SampleResult,
    SavedState,
    SaveStateRequest,
    SessionInfo,
)
from tensafe.errors import TensafeError, UsageError
from tensafe.server import audit
from tensafe.server.crypto import open_meta

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from tensafe.server.service import SessionService
    from tensafe.session_manager import LoadedSession
    from tensafe.sessions import TrainingSessionCore


def sample(service: SessionService, live: LoadedSession, session_id: str, request: SampleRequest) -> SampleResult:
    core: TrainingSessionCore = live.core
    responses = service.sessions.run(
        session_id, live, "sample", lambda: core.sample(request.prompts, request.sampling_params, request.num_samples)
    )
    return SampleResult(responses=responses)


def save_state(service: SessionService, live: LoadedSession, session_id: str, request: SaveStateRequest) -> SavedState:
    core: TrainingSessionCore = live.core
    tenant_id = live.tenant_id
    saved: list[SavedState] = []

    def record(db: Session, snapshot: tuple[bytes, dict[str, Any]]) -> None:
        state_id = service.store_artifact(db, tenant_id, "state", snapshot[0], request.name or "", snapshot[1])
        saved.append(SavedState(state_id=state_id, step=core.step, epsilon=core.epsilon()))
        audit.append(
            db,
            service.keyring.audit_key,
            tenant_id,
            "save_state",
            session_id,
            {"name": request.name},
            saved[0].model_dump(),
            core.epsilon(),
        )

    service.sessions.run(session_id, live, "save_state", core.snapshot, record)
    return saved[0]


def load_state(service: SessionService, live: LoadedSession, session_id: str, request: LoadStateRequest) -> SessionInfo:
    """Restore a saved state; committed as the session's recovery point (its spend never goes down)."""
    core: TrainingSessionCore = live.core
    tenant_id, state_id = live.tenant_id, request.state_id
    with service.db() as db:
        artifact, state = service._artifact(db, tenant_id, state_id, "state")
    meta = open_meta(service.keyring.meta_key, f"{tenant_id}/{state_id}", artifact.meta)

    def record(db: Session, _: None) -> None:
        audit.append(
            db,
            service.keyring.audit_key,
            tenant_id,
            "load_state",
            session_id,
            {"state_id": state_id},
            {"step": core.step},
            core.epsilon(),
        )

    service.sessions.run(session_id, live, "load_state", lambda: core.restore(state, meta), record, state_changed=True)
    return service.info(tenant_id, session_id)


def export_tgsp(
    service: SessionService, live: LoadedSession, session_id: str, request: ExportRequest
) -> ExportedPackage:
    """Sign the adapter with the tenant's key; encrypt it to the tenant's key and ``request.recipients``."""
    core: TrainingSessionCore = live.core
    tenant_id = live.tenant_id
    exported: list[ExportedPackage] = []

    def package() -> tuple[dict[str, Any], bytes]:
        with service.tgsp.workspace() as directory, service.tgsp.files(tenant_id, directory) as keys:
            output = directory / "adapter.tgsp"
            settings = service.tgsp.export_settings(keys, directory, request.recipients)
            try:
                manifest = core.export_tgsp(output, settings)
            except TensafeError as exc:
                raise UsageError(f"export refused: {exc}") from None
            return manifest, output.read_bytes()

    def record(db: Session, made: tuple[dict[str, Any], bytes]) -> None:
        manifest, data = made
        meta = {"package_id": manifest.get("package_id"), "session_id": session_id}
        artifact_id = service.store_artifact(db, tenant_id, "tgsp", data, request.name or "", meta)
        exported.append(ExportedPackage(artifact_id=artifact_id, package_id=manifest.get("package_id"), step=core.step))
        audit.append(
            db,
            service.keyring.audit_key,
            tenant_id,
            "export_tgsp",
            session_id,
            {"name": request.name},
            exported[0].model_dump(),
            core.epsilon(),
        )

    service.sessions.run(session_id, live, "export_tgsp", package, record)
    return exported[0]


Handler = Callable[[Any, Any, str, Any], BaseModel]
#: Operation name -> (request model, response model, handler).
SYNCHRONOUS: dict[str, tuple[type[BaseModel], type[BaseModel], Handler]] = {
    "sample": (SampleRequest, SampleResult, sample),
    "save_state": (SaveStateRequest, SavedState, save_state),
    "load_state": (LoadStateRequest, SessionInfo, load_state),
    "export_tgsp": (ExportRequest, ExportedPackage, export_tgsp),
}
