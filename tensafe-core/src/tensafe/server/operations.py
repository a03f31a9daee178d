"""A training session's synchronous operations, as the replica holding the session runs them.

Each takes the session's loaded copy (on its worker thread, in the order the
session's operations were submitted) and a request model, and returns a
response model, so that the operation can run here or be handed, as JSON, to
the replica that holds the session (:mod:`tensafe.server.handoff`).
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
    from tensafe.server.queued import _Live
    from tensafe.server.service import SessionService
    from tensafe.sessions import TrainingSessionCore


def sample(service: SessionService, live: _Live, session_id: str, request: SampleRequest) -> SampleResult:
    core: TrainingSessionCore = live.core
    return SampleResult(responses=core.sample(request.prompts, request.sampling_params, request.num_samples))


def save_state(service: SessionService, live: _Live, session_id: str, request: SaveStateRequest) -> SavedState:
    core: TrainingSessionCore = live.core
    tenant_id = live.tenant_id
    state, meta = core.snapshot()
    with service.db() as db:
        state_id = service.store_artifact(db, tenant_id, "state", state, request.name or "", meta)
        saved = SavedState(state_id=state_id, step=core.step, epsilon=core.epsilon())
        audit.append(
            db,
            service.keyring.audit_key,
            tenant_id,
            "save_state",
            session_id,
            {"name": request.name},
            saved.model_dump(),
            core.epsilon(),
        )
    return saved


def load_state(service: SessionService, live: _Live, session_id: str, request: LoadStateRequest) -> SessionInfo:
    core: TrainingSessionCore = live.core
    tenant_id, state_id = live.tenant_id, request.state_id
    with service.db() as db:
        artifact, state = service._artifact(db, tenant_id, state_id, "state")
        core.restore(state, open_meta(service.keyring.meta_key, f"{tenant_id}/{state_id}", artifact.meta))
        row = service._row(db, tenant_id, session_id)
        replaced = service._commit_state(db, row, live)
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
        info = service._info(row)
    if replaced is not None:
        service.store.discard_file(tenant_id, replaced)
    return info


def export_tgsp(service: SessionService, live: _Live, session_id: str, request: ExportRequest) -> ExportedPackage:
    """Sign the adapter with the tenant's key; encrypt it to the tenant's key and ``request.recipients``."""
    core: TrainingSessionCore = live.core
    tenant_id = live.tenant_id
    with service.tgsp.workspace() as directory, service.tgsp.files(tenant_id, directory) as keys:
        output = directory / "adapter.tgsp"
        settings = service.tgsp.export_settings(keys, directory, request.recipients)
        try:
            manifest = core.export_tgsp(output, settings)
        except TensafeError as exc:
            raise UsageError(f"export refused: {exc}") from None
        package = output.read_bytes()
    with service.db() as db:
        meta = {"package_id": manifest.get("package_id"), "session_id": session_id}
        artifact_id = service.store_artifact(db, tenant_id, "tgsp", package, request.name or "", meta)
        exported = ExportedPackage(artifact_id=artifact_id, package_id=manifest.get("package_id"), step=core.step)
        audit.append(
            db,
            service.keyring.audit_key,
            tenant_id,
            "export_tgsp",
            session_id,
            {"name": request.name},
            exported.model_dump(),
            core.epsilon(),
        )
    return exported


Handler = Callable[[Any, Any, str, Any], BaseModel]
#: Operation name -> (request model, response model, handler).
SYNCHRONOUS: dict[str, tuple[type[BaseModel], type[BaseModel], Handler]] = {
    "sample": (SampleRequest, SampleResult, sample),
    "save_state": (SaveStateRequest, SavedState, save_state),
    "load_state": (LoadStateRequest, SessionInfo, load_state),
    "export_tgsp": (ExportRequest, ExportedPackage, export_tgsp),
}
