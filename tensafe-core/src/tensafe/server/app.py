"""The FastAPI application: ``/api/v1/training``, ``/api/v1/inference``, ``/api/v1/audit``, health.

Every error is JSON ``{"error": <stable code>, "message": ...}`` with a 4xx
status for a request the client can fix; the codes are those of
:mod:`tensafe.errors` plus ``malformed_json``, ``invalid_request`` (schema
violations, with ``problems``) and ``payload_too_large``.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any

from fastapi import BackgroundTasks, Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tensafe import __version__
from tensafe.api import (
    AuditReceipt,
    AuditRecordInfo,
    AuditVerification,
    DatasetInfo,
    ExportedPackage,
    ExportRequest,
    ForwardBackwardRequest,
    FutureInfo,
    LoadStateRequest,
    ModelInfo,
    OptimStepRequest,
    RemoteInferenceSessionCreate,
    RemoteTrainingSessionCreate,
    SampleRequest,
    SampleResult,
    SavedState,
    SaveStateRequest,
    SessionInfo,
    TenantKeys,
    TrainStepRequest,
)
from tensafe.errors import (
    NotFound,
    NotInstalledError,
    OperationFailed,
    PayloadTooLarge,
    PrivacyBudgetExceeded,
    StepVetoed,
    TensafeError,
    Unauthorized,
    UsageError,
)
from tensafe.server.auth import authenticate
from tensafe.server.he_routes import ADAPTERS_PATH, add_he_routes
from tensafe.server.idempotency import Creations
from tensafe.server.logs import RequestContext
from tensafe.server.metrics import RequestMetrics, ServerMetrics
from tensafe.server.quotas import QuotaGuard, Quotas, RetryLater
from tensafe.server.service import SessionService
from tensafe.server.tenant_keys import MAX_PACKAGE_BYTES
from tensafe.server.uploads import MAX_DATASET_BYTES, receive
from tensafe.types import INT64_MAX

#: Largest request body accepted (a forward_backward batch of long sequences fits easily).
MAX_BODY_BYTES = 32 * 1024 * 1024
PREFIX = "/api/v1"
#: How long /readyz waits for the database before answering 503 not_ready.
READY_TIMEOUT_S = 2.0


def status_for(exc: TensafeError) -> int:
    """The HTTP status of a TenSafe error."""
    if isinstance(exc, Unauthorized):
        return 401
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, PayloadTooLarge):
        return 413
    if isinstance(exc, PrivacyBudgetExceeded | StepVetoed):
        return 409
    if isinstance(exc, OperationFailed):
        return 429 if exc.retryable else 500
    if isinstance(exc, UsageError | NotInstalledError):
        return 400
    return 400 if exc.exit_code == 2 else 500


def _error_response(status: int, body: dict[str, Any]) -> JSONResponse:
    return JSONResponse(status_code=status, content=body)


class BodyLimit:
    """Refuses bodies over the limit before reading them (by Content-Length) or while reading them."""

    def __init__(self, app: ASGIApp, limit: int, exempt: tuple[str, ...] = ()) -> None:
        self.app = app
        self.limit = limit
        self.exempt = frozenset(exempt)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope.get("method") == "POST" and scope.get("path") in self.exempt):
            await self.app(scope, receive, send)
            return
        too_large = _error_response(413, PayloadTooLarge(f"request body exceeds {self.limit} bytes").to_dict())
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                await too_large(scope, receive, send)
                return
        seen = 0
        exceeded = False

        async def limited() -> Message:
            # Past the limit, the app gets an ended body and its response is replaced by the 413.
            nonlocal seen, exceeded
            if exceeded:
                return {"type": "http.request", "body": b"", "more_body": False}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    exceeded = True
                    return {"type": "http.request", "body": b"", "more_body": False}
            return message

        replaced = False

        async def guarded(message: Message) -> None:
            nonlocal replaced
            if not exceeded:
                await send(message)
            elif not replaced:
                replaced = True
                await too_large(scope, limited, send)

        await self.app(scope, limited, guarded)


def _tenant(request: Request, authorization: Annotated[str | None, Header()] = None) -> str:
    """The tenant whose API key the request carries (401 without a valid one)."""
    token = None
    if authorization is not None:
        scheme, _, value = authorization.partition(" ")
        token = value.strip() if scheme.lower() == "bearer" else None
    service: SessionService = request.app.state.service
    with service.db() as db:
        return authenticate(db, token)


Tenant = Annotated[str, Depends(_tenant)]
#: Sent by the SDK with each queued operation, so a retried submission is not run twice.
IdempotencyKey = Annotated[str | None, Header(max_length=64)]
#: A label for an upload.
UploadName = Annotated[str, Query(max_length=200, pattern=r"^[^\x00-\x1f]*$")]
#: Paths whose bodies are streamed to disk under their own cap instead of read into memory.
UPLOAD_PATHS = (f"{PREFIX}/packages", f"{PREFIX}/datasets", ADAPTERS_PATH)


def create_app(
    service: SessionService,
    *,
    max_body_bytes: int = MAX_BODY_BYTES,
    quotas: Quotas | None = None,
    he_mask_workers: int | None = None,
) -> FastAPI:
    """The HTTP API over ``service``, each tenant held to ``quotas`` (the defaults when None);
    ``he_mask_workers``: mask-making processes per HE inference session (None: $TENSAFE_HE_MASK_WORKERS or 0)."""
    from fastapi_offline import FastAPIOffline

    # Swagger UI's assets come from the fastapi-offline wheel, not a CDN: /docs works on an air-gapped host.
    app = FastAPIOffline(
        docs_url="/docs",
        redoc_url=None,
        static_url="/docs-assets",
        swagger_ui_parameters={"validatorUrl": None},
        title="TenSafe",
        version=__version__,
        description="Private LoRA fine-tuning and inference: training sessions with DP-SGD and exact "
        "privacy accounting, TGSP packages, a per-tenant hash-chained audit log.",
    )

    @app.exception_handler(TensafeError)
    async def tensafe_error(_: Request, exc: TensafeError) -> JSONResponse:
        return _error_response(status_for(exc), exc.to_dict())

    @app.exception_handler(RetryLater)
    async def retry_later(_: Request, exc: RetryLater) -> JSONResponse:
        response = _error_response(429, exc.to_dict())
        if exc.retry_after is not None:
            response.headers["Retry-After"] = str(exc.retry_after)
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(err.get("type") == "json_invalid" for err in errors):
            return _error_response(400, {"error": "malformed_json", "message": "the request body is not valid JSON"})
        problems = [
            {"field": ".".join(str(p) for p in err.get("loc", ())), "message": str(err.get("msg", ""))}
            for err in errors
        ]
        message = "; ".join(f"{p['field']}: {p['message']}" for p in problems[:5])
        return _error_response(422, {"error": "invalid_request", "message": message, "problems": problems})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error_response(exc.status_code, {"error": code, "message": str(exc.detail)})

    app.state.service = service
    guard = QuotaGuard(quotas or Quotas(), service.db)
    creations = Creations(service.db)
    metrics = ServerMetrics(service.db, service.pm)

    # The health checks never queue behind tenant work: they run on the event loop, and readiness's
    # database check on a thread of its own (one: a database that hangs ties up no more than that).
    readiness = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tensafe-readyz")

    def database_answers() -> None:
        from sqlalchemy import text

        with service.db() as db:
            db.execute(text("SELECT 1"))

    @app.get("/metrics", tags=["health"], response_class=Response)
    def prometheus_metrics() -> Response:
        """Prometheus metrics: requests, latencies, unfinished operations, optimizer steps, epsilon per tenant id."""
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    @app.get("/healthz", tags=["health"])
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], response_model=dict[str, str])
    async def ready() -> dict[str, str] | JSONResponse:
        try:
            await asyncio.wait_for(asyncio.wrap_future(readiness.submit(database_answers)), READY_TIMEOUT_S)
        except Exception:  # a database that fails or hangs: not ready, and no details to an unauthenticated caller
            message = f"the database did not answer within {READY_TIMEOUT_S:g} s"
            return _error_response(503, {"error": "not_ready", "message": message})
        return {"status": "ready"}

    # -- training -------------------------------------------------------------

    @app.post(f"{PREFIX}/training", tags=["training"], status_code=201)
    async def create_training(
        body: RemoteTrainingSessionCreate, tenant_id: Tenant, idempotency_key: IdempotencyKey = None
    ) -> SessionInfo:
        """Create a training session; a retry with the same Idempotency-Key returns the first one."""

        def make() -> SessionInfo:
            guard.check_sessions(tenant_id)
            return service.create_training(tenant_id, body)

        request = f"training {body.model_dump_json()}"
        return await creations.create(tenant_id, idempotency_key, request, make, lambda s: service.info(tenant_id, s))

    @app.get(f"{PREFIX}/training", tags=["training"])
    def list_training(tenant_id: Tenant) -> list[SessionInfo]:
        return [s for s in service.list_sessions(tenant_id) if s.kind == "training"]

    @app.get(f"{PREFIX}/sessions", tags=["training"])
    def list_sessions(tenant_id: Tenant) -> list[SessionInfo]:
        """Every session of yours, training and inference, oldest first: attach to one after a restart."""
        return service.list_sessions(tenant_id)

    @app.get(f"{PREFIX}/training/{{session_id}}", tags=["training"])
    def training_info(session_id: str, tenant_id: Tenant) -> SessionInfo:
        return service.info(tenant_id, session_id)

    async def queued(
        tenant_id: str,
        session_id: str,
        body: ForwardBackwardRequest | OptimStepRequest | TrainStepRequest,
        key: str | None,
        background: BackgroundTasks,
    ) -> FutureInfo:
        await run_in_threadpool(guard.check_queued, tenant_id)
        # The worker starts once the reply is sent: its computation never delays the 202.
        info = await run_in_threadpool(service.submit, tenant_id, session_id, body, key, defer=True)
        background.add_task(service.start_session, session_id)
        return info

    @app.post(f"{PREFIX}/training/{{session_id}}/forward_backward", tags=["training"], status_code=202)
    async def forward_backward(
        session_id: str,
        body: ForwardBackwardRequest,
        tenant_id: Tenant,
        background: BackgroundTasks,
        idempotency_key: IdempotencyKey = None,
    ) -> FutureInfo:
        return await queued(tenant_id, session_id, body, idempotency_key, background)

    @app.post(f"{PREFIX}/training/{{session_id}}/optim_step", tags=["training"], status_code=202)
    async def optim_step(
        session_id: str,
        body: OptimStepRequest,
        tenant_id: Tenant,
        background: BackgroundTasks,
        idempotency_key: IdempotencyKey = None,
    ) -> FutureInfo:
        return await queued(tenant_id, session_id, body, idempotency_key, background)

    @app.post(f"{PREFIX}/training/{{session_id}}/train_step", tags=["training"], status_code=202)
    async def train_step(
        session_id: str,
        body: TrainStepRequest,
        tenant_id: Tenant,
        background: BackgroundTasks,
        idempotency_key: IdempotencyKey = None,
    ) -> FutureInfo:
        """One step on a batch the server Poisson-samples from the session's dataset (sessions with dataset_id)."""
        return await queued(tenant_id, session_id, body, idempotency_key, background)

    @app.post(f"{PREFIX}/training/{{session_id}}/sample", tags=["training"])
    def sample(session_id: str, body: SampleRequest, tenant_id: Tenant) -> SampleResult:
        return service.sample(tenant_id, session_id, body)

    @app.post(f"{PREFIX}/training/{{session_id}}/save_state", tags=["training"])
    def save_state(session_id: str, body: SaveStateRequest, tenant_id: Tenant) -> SavedState:
        return service.save_state(tenant_id, session_id, body.name)

    @app.post(f"{PREFIX}/training/{{session_id}}/load_state", tags=["training"])
    def load_state(session_id: str, body: LoadStateRequest, tenant_id: Tenant) -> SessionInfo:
        return service.load_state(tenant_id, session_id, body.state_id)

    @app.post(f"{PREFIX}/training/{{session_id}}/export_tgsp", tags=["training"])
    def export_tgsp(session_id: str, body: ExportRequest, tenant_id: Tenant) -> ExportedPackage:
        return service.export_tgsp(tenant_id, session_id, body)

    @app.get(f"{PREFIX}/futures/{{future_id}}", tags=["training"])
    async def future(future_id: str, tenant_id: Tenant, wait: Annotated[float, Query(ge=0, le=30)] = 0.0) -> FutureInfo:
        """The future's status; with ``wait``, once it finishes or ``wait`` seconds pass. A tenant holds at
        most MAX_WAITS_PER_TENANT (16) waits at once; past that a request answers at once, as with wait=0."""
        return await service.wait_future(tenant_id, future_id, wait)

    @app.get(f"{PREFIX}/packages/{{artifact_id}}", tags=["training"])
    def package(artifact_id: str, tenant_id: Tenant) -> Response:
        return Response(service.tgsp.package_bytes(tenant_id, artifact_id), media_type="application/octet-stream")

    @app.post(f"{PREFIX}/packages", tags=["packages"], status_code=201)
    async def upload_package(request: Request, tenant_id: Tenant, name: UploadName = "") -> ExportedPackage:
        """Upload a TGSP package (the body, as bytes). It is stored only once it verifies as the server would
        open it: signed by the tenant's server-held key or a signer the operator trusts, within its policy,
        and encrypted to the tenant's recipient key (GET /api/v1/keys)."""
        with service.tgsp.workspace() as directory:
            allowed = await run_in_threadpool(guard.upload_allowance, tenant_id, MAX_PACKAGE_BYTES)
            path = await receive(request, directory / "upload.tgsp", allowed)
            return await run_in_threadpool(service.tgsp.upload, tenant_id, path, name)

    @app.get(f"{PREFIX}/keys", tags=["packages"])
    def tenant_keys(tenant_id: Tenant) -> TenantKeys:
        """The public halves of the TGSP keys the server holds for you."""
        return service.tgsp.public(tenant_id)

    @app.post(f"{PREFIX}/datasets", tags=["training"], status_code=201)
    async def upload_dataset(request: Request, tenant_id: Tenant, name: UploadName = "") -> DatasetInfo:
        """Upload a JSONL dataset (the body), stored encrypted under your tenant key; train on it with a
        session created with its dataset_id, whose batches the server Poisson-samples."""
        with service.tgsp.workspace() as directory:
            allowed = await run_in_threadpool(guard.upload_allowance, tenant_id, MAX_DATASET_BYTES)
            path = await receive(request, directory / "dataset.jsonl", allowed)
            return await run_in_threadpool(service.upload_dataset, tenant_id, path.read_bytes(), name)

    @app.get(f"{PREFIX}/models", tags=["inference"])
    def models(tenant_id: Tenant) -> list[ModelInfo]:
        """The models this server trains and serves, by the names its operator registered."""
        return service.models_listing()

    # -- inference ------------------------------------------------------------

    @app.post(f"{PREFIX}/inference", tags=["inference"], status_code=201)
    async def create_inference(
        body: RemoteInferenceSessionCreate, tenant_id: Tenant, idempotency_key: IdempotencyKey = None
    ) -> SessionInfo:
        """Create an inference session; a retry with the same Idempotency-Key returns the first one."""

        def make() -> SessionInfo:
            guard.check_sessions(tenant_id)
            return service.inference.create(tenant_id, body)

        request = f"inference {body.model_dump_json()}"
        return await creations.create(tenant_id, idempotency_key, request, make, lambda s: service.info(tenant_id, s))

    @app.get(f"{PREFIX}/inference/{{session_id}}", tags=["inference"])
    def inference_info(session_id: str, tenant_id: Tenant) -> SessionInfo:
        info = service.info(tenant_id, session_id)
        if info.kind != "inference":
            raise NotFound(f"no inference session {session_id}")
        return info

    @app.post(f"{PREFIX}/inference/{{session_id}}/generate", tags=["inference"])
    def generate(session_id: str, body: SampleRequest, tenant_id: Tenant) -> SampleResult:
        return service.inference.generate(tenant_id, session_id, body)

    app.state.he_sessions = add_he_routes(
        app, service, _tenant, guard, creations, mask_workers=he_mask_workers
    )  # /api/v1/he

    # -- audit ----------------------------------------------------------------

    @app.get(f"{PREFIX}/audit", tags=["audit"])
    def audit_chain(
        tenant_id: Tenant,
        after: Annotated[int, Query(ge=0, le=INT64_MAX)] = 0,
        limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
    ) -> list[AuditRecordInfo]:
        return service.chains.records(tenant_id, limit=limit, after=after)

    @app.get(f"{PREFIX}/audit/receipt", tags=["audit"])
    def audit_receipt(tenant_id: Tenant) -> AuditReceipt:
        """A receipt, signed by the server, for your audit chain as it stands now. Keep it: `tensafe audit
        verify --receipt` then fails if the chain is ever cut or rewritten below that point."""
        return service.chains.receipt(tenant_id)

    @app.get(f"{PREFIX}/audit/verify", tags=["audit"])
    def audit_verify(tenant_id: Tenant) -> AuditVerification:
        return service.chains.verify(tenant_id)

    app.add_middleware(BodyLimit, limit=max_body_bytes, exempt=UPLOAD_PATHS)
    app.add_middleware(RequestMetrics, metrics=metrics)
    app.add_middleware(RequestContext)  # outermost: the request id is set before anything else logs
    return app
