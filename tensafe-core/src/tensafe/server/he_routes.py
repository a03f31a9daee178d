"""``/api/v1/he``: HE inference over HTTP, the server evaluating and the client holding the key.

``POST /he/adapters`` (body: an encrypted adapter frame, ``application/octet-stream``)
stores what a key owner's ``KeyOwner.encrypt_adapter`` made; ``POST /he/sessions``
serves it, or an HE-encrypted .tgsp package uploaded to ``/packages``, on a
registered model. ``POST /he/sessions/{id}/generate`` starts a generation and
``POST /he/sessions/{id}/turn`` answers it; both reply with the evaluator's next
request (a turn frame, ``application/octet-stream``) or the final
:class:`~tensafe.api.SampleResult` (JSON). See :mod:`tensafe.server.he_sessions`.
"""

# No ``from __future__ import annotations``: the routes' parameter types, built inside add_he_routes
# around the app's own tenant dependency, must be evaluated where they are defined for FastAPI to see them.
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from tensafe.api import (
    NAME_PATTERN,
    HEAdapterInfo,
    RemoteHEInferenceSessionCreate,
    SampleRequest,
    SampleResult,
    SessionInfo,
)
from tensafe.server.he_sessions import MAX_HE_ADAPTER_BYTES, HESessions
from tensafe.server.uploads import receive

if TYPE_CHECKING:
    from collections.abc import Callable

    from tensafe.server.idempotency import Creations
    from tensafe.server.quotas import QuotaGuard
    from tensafe.server.service import SessionService

PREFIX = "/api/v1/he"
#: The upload path, streamed to disk under its own cap (the app's body limit does not apply to it).
ADAPTERS_PATH = f"{PREFIX}/adapters"
#: The media type of turn frames.
FRAME_TYPE = "application/octet-stream"


def _reply(out: bytes | SampleResult) -> Response:
    if isinstance(out, bytes):
        return Response(out, media_type=FRAME_TYPE)
    return JSONResponse(out.model_dump(mode="json"))


def add_he_routes(
    app: FastAPI,
    service: "SessionService",
    tenant: "Callable[..., str]",
    guard: "QuotaGuard",
    creations: "Creations",
    *,
    mask_workers: int | None = None,
) -> HESessions:
    """Register the HE inference routes on ``app``; the sessions are closed when the app shuts down."""
    sessions = HESessions(service, mask_workers=mask_workers)
    Tenant = Annotated[str, Depends(tenant)]
    previous = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(owner: Any) -> AsyncIterator[Any]:
        async with previous(owner) as state:
            try:
                yield state
            finally:
                sessions.close()

    app.router.lifespan_context = lifespan

    @app.post(ADAPTERS_PATH, tags=["he"], status_code=201)
    async def upload_he_adapter(
        request: Request,
        tenant_id: Tenant,
        he_backend: Annotated[str, Query(pattern=NAME_PATTERN)] = "seal-ckks",
        name: Annotated[str, Query(max_length=200, pattern=r"^[^\x00-\x1f]*$")] = "",
    ) -> HEAdapterInfo:
        """Upload an encrypted adapter (``KeyOwner.encrypt_adapter``'s frame, as bytes). It is stored only if it
        parses as one: public parameters, public key and ciphertexts; a frame holding a secret key is refused."""
        with service.tgsp.workspace() as directory:
            allowed = await run_in_threadpool(guard.upload_allowance, tenant_id, MAX_HE_ADAPTER_BYTES)
            path = await receive(request, directory / "adapter.he", allowed)
            return await run_in_threadpool(sessions.upload_adapter, tenant_id, path, he_backend, name)

    @app.post(f"{PREFIX}/sessions", tags=["he"], status_code=201)
    async def create_he_session(
        body: RemoteHEInferenceSessionCreate,
        tenant_id: Tenant,
        idempotency_key: Annotated[str | None, Header(max_length=64)] = None,
    ) -> SessionInfo:
        """Serve a registered model with an encrypted adapter; generate with ``/generate`` and ``/turn``."""

        def make() -> SessionInfo:
            guard.check_sessions(tenant_id)
            return sessions.create(tenant_id, body)

        request = f"he-inference {body.model_dump_json()}"
        return await creations.create(tenant_id, idempotency_key, request, make, lambda s: sessions.info(tenant_id, s))

    @app.get(f"{PREFIX}/sessions/{{session_id}}", tags=["he"])
    def he_session_info(session_id: str, tenant_id: Tenant) -> SessionInfo:
        return sessions.info(tenant_id, session_id)

    @app.post(f"{PREFIX}/sessions/{{session_id}}/generate", tags=["he"], response_model=None)
    async def he_generate(session_id: str, body: SampleRequest, tenant_id: Tenant) -> Response:
        """Start a generation: the reply is its first request (a turn frame, application/octet-stream) for
        your key owner to answer with ``/turn``, or the SampleResult (JSON)."""
        return _reply(await run_in_threadpool(sessions.generate, tenant_id, session_id, body))

    @app.post(f"{PREFIX}/sessions/{{session_id}}/turn", tags=["he"], response_model=None)
    async def he_turn(session_id: str, request: Request, tenant_id: Tenant) -> Response:
        """Answer the awaited turn (the body: a turn frame carrying the key owner's response); the reply is
        the next request or the SampleResult."""
        body = await request.body()
        return _reply(await run_in_threadpool(sessions.turn, tenant_id, session_id, body))

    @app.delete(f"{PREFIX}/sessions/{{session_id}}/generation", tags=["he"], status_code=204, response_model=None)
    def he_cancel(session_id: str, tenant_id: Tenant) -> Response:
        """Cancel the running generation (a key owner that stops answering is cancelled after the turn timeout)."""
        sessions.cancel(tenant_id, session_id)
        return Response(status_code=204)

    return sessions
