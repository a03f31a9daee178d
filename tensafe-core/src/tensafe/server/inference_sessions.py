"""Inference sessions on a server: a registered model, optionally with an adapter from a package the tenant owns.

They hold nothing that changes, so every replica serves them from its own copy
(no lease, no state to commit).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from tensafe.api import RemoteInferenceSessionCreate, SampleRequest, SampleResult, SessionInfo
from tensafe.errors import NotFound, TensafeError, UsageError
from tensafe.server import audit
from tensafe.server.db import SessionRow
from tensafe.server.queued import _new_id as new_id
from tensafe.session_manager import LoadedSession
from tensafe.sessions import InferenceSessionCore

if TYPE_CHECKING:
    from tensafe.server.service import SessionService


class InferenceSessions:
    """Creates, rebuilds and runs a server's inference sessions."""

    def __init__(self, service: SessionService) -> None:
        self.service = service

    def core(
        self, db: Session, tenant_id: str, session_id: str, spec: RemoteInferenceSessionCreate
    ) -> InferenceSessionCore:
        config = self.service.models.run_config(spec.config, self.service.scratch)
        if spec.adapter_artifact_id is None:
            return InferenceSessionCore(config, session_id, plugin_manager=self.service.pm)
        _, package = self.service._artifact(db, tenant_id, spec.adapter_artifact_id, "tgsp")
        with self.service.tgsp.workspace() as directory, self.service.tgsp.files(tenant_id, directory) as keys:
            path = directory / "adapter.tgsp"
            path.write_bytes(package)
            config = config.model_copy(update={"tgsp": self.service.tgsp.open_settings(keys)})
            try:
                return InferenceSessionCore(config, session_id, adapter=path, plugin_manager=self.service.pm)
            except TensafeError as exc:
                if isinstance(exc, NotFound):
                    raise
                raise UsageError(f"the package cannot be served: {exc}") from None

    def create(self, tenant_id: str, spec: RemoteInferenceSessionCreate) -> SessionInfo:
        session_id = new_id()
        with self.service.db() as db:
            core = self.core(db, tenant_id, session_id, spec)
            row = SessionRow(
                id=session_id, tenant_id=tenant_id, kind="inference", spec=spec.model_dump_json(), created=time.time()
            )
            db.add(row)
            audit.append(
                db,
                self.service.keyring.audit_key,
                tenant_id,
                "inference.create",
                session_id,
                spec.model_dump(mode="json"),
                {},
            )
        self.service.sessions.add(session_id, LoadedSession(tenant_id, "inference", core))
        return self.service._info(row)

    def generate(self, tenant_id: str, session_id: str, request: SampleRequest) -> SampleResult:
        live = self.service._live_session(tenant_id, session_id, "inference")
        assert live is not None  # every replica serves inference sessions itself
        core: InferenceSessionCore = live.core
        responses = self.service.sessions.call(
            live, lambda: core.generate(request.prompts, request.sampling_params, request.num_samples)
        )
        return SampleResult(responses=responses)
