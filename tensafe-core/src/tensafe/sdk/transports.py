"""The SDK's two transports: sessions in this process, or over HTTP on ``tensafe serve``.

Both expose the same calls with the same request and response types
(:mod:`tensafe.api`) and the same typed errors, so a script behaves the same
through either.
"""

from __future__ import annotations

import functools
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from tensafe.api import (
    AuditReceipt,
    DatasetInfo,
    ExportedPackage,
    ExportRequest,
    ForwardBackwardRequest,
    FutureInfo,
    InferenceSessionCreate,
    LoadStateRequest,
    ModelInfo,
    RemoteInferenceSessionCreate,
    RemoteTrainingSessionCreate,
    SampleRequest,
    SampleResult,
    SavedState,
    SaveStateRequest,
    SessionInfo,
    TenantKeys,
    TrainingSessionCreate,
    TrainStepRequest,
)
from tensafe.data import load_records
from tensafe.errors import MissingDependencyError, OperationFailed, UsageError
from tensafe.sdk.errors import error_from
from tensafe.sdk.futures import APIFuture
from tensafe.session_manager import LoadedSession, MemorySessionStore, Queued, SessionManager, execute, operation_name
from tensafe.sessions import InferenceSessionCore, TrainingSessionCore

if TYPE_CHECKING:
    import httpx

    from tensafe.plugins import TensafePluginManager

T = TypeVar("T")
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
#: Statuses whose Retry-After header the SDK honours.
RETRY_AFTER_STATUSES = frozenset({429, 503})
#: Methods safe to send again; other requests are resent only when they carry an Idempotency-Key.
SAFE_METHODS = frozenset({"GET", "HEAD"})


class Transport(Protocol):
    """What a session of the SDK calls, whichever side of a process boundary the session lives on."""

    def info(self, session_id: str) -> SessionInfo: ...

    def submit(self, session_id: str, request: Queued) -> APIFuture[dict[str, Any]]: ...

    def sample(self, session_id: str, request: SampleRequest) -> SampleResult: ...

    def save_state(self, session_id: str, name: str | None) -> SavedState: ...

    def load_state(self, session_id: str, state_id: str) -> SessionInfo: ...

    def export_tgsp(self, session_id: str, path: Path, recipients: list[str]) -> ExportedPackage: ...

    def generate(self, session_id: str, request: SampleRequest) -> SampleResult: ...

    def list_sessions(self) -> list[SessionInfo]: ...

    def close(self) -> None: ...


class InProcessTransport:
    """Sessions in this process: the session manager over a memory store.

    Each session runs its operations in order on its own worker thread, and
    every step commits the session's state to the store (compare-and-set on
    the step) before its future completes, as on a server.
    """

    def __init__(self, plugin_manager: TensafePluginManager | None = None) -> None:
        from tensafe.plugins import create_plugin_manager

        self.pm = plugin_manager if plugin_manager is not None else create_plugin_manager()
        self.store = MemorySessionStore()
        self.sessions: SessionManager[None] = SessionManager(self.store)

    def _loaded(self, session_id: str) -> LoadedSession:
        """The session's live copy, rebuilt from its last committed state if it was evicted."""
        loaded = self.sessions.get(session_id)
        if loaded is not None:
            return loaded
        with self.sessions.loading:
            loaded = self.sessions.get(session_id)
            if loaded is None:
                loaded = self.sessions.add(session_id, self.store.load(session_id))
            return loaded

    def _in_order(self, session_id: str, operation: str, work: Callable[[Any], T], *, changed: bool = False) -> T:
        loaded = self._loaded(session_id)
        return self.sessions.call(
            loaded,
            lambda: self.sessions.run(session_id, loaded, operation, lambda: work(loaded.core), state_changed=changed),
        )

    def _create(self, kind: str, rebuild: Callable[[str], Any]) -> SessionInfo:
        session_id = uuid.uuid4().hex
        make = functools.partial(rebuild, session_id)
        loaded = LoadedSession("", kind, make())
        self.store.create(session_id, kind, make, loaded)
        self.sessions.add(session_id, loaded)
        return self.info(session_id)

    def create_training(self, spec: TrainingSessionCreate, dataset: Path | None = None) -> SessionInfo:
        """A session on batches the caller supplies, or (``dataset``, a JSONL file) on batches it samples itself."""
        records = load_records(dataset) if dataset is not None else None
        return self._create(
            "training",
            lambda session_id: TrainingSessionCore(spec, session_id, plugin_manager=self.pm, dataset=records),
        )

    def create_inference(self, spec: InferenceSessionCreate, adapter: Path | None) -> SessionInfo:
        return self._create(
            "inference",
            lambda session_id: InferenceSessionCore(spec.config, session_id, adapter=adapter, plugin_manager=self.pm),
        )

    def info(self, session_id: str) -> SessionInfo:
        loaded = self._loaded(session_id)
        core = loaded.core
        if isinstance(core, InferenceSessionCore):
            return SessionInfo(session_id=session_id, kind="inference", created=loaded.created)
        return SessionInfo(
            session_id=session_id,
            kind="training",
            step=core.step,
            privacy=core.privacy_spent(),
            pending=loaded.pending,
            created=loaded.created,
        )

    def submit(self, session_id: str, request: Queued) -> APIFuture[dict[str, Any]]:
        loaded = self._loaded(session_id)
        operation = operation_name(request)
        future = loaded.submit(
            lambda: self.sessions.run(session_id, loaded, operation, lambda: execute(loaded.core, request))
        )
        return APIFuture(uuid.uuid4().hex, future)

    def sample(self, session_id: str, request: SampleRequest) -> SampleResult:
        responses = self._in_order(
            session_id,
            "sample",
            lambda core: core.sample(request.prompts, request.sampling_params, request.num_samples),
        )
        return SampleResult(responses=responses)

    def save_state(self, session_id: str, name: str | None) -> SavedState:
        def work(core: TrainingSessionCore) -> SavedState:
            state_id = uuid.uuid4().hex
            self.store.save_named(state_id, core.snapshot())
            return SavedState(state_id=state_id, step=core.step, epsilon=core.epsilon())

        return self._in_order(session_id, "save_state", work)

    def load_state(self, session_id: str, state_id: str) -> SessionInfo:
        state, meta = self.store.named(state_id)
        self._in_order(session_id, "load_state", lambda core: core.restore(state, meta), changed=True)
        return self.info(session_id)

    def export_tgsp(self, session_id: str, path: Path, recipients: list[str]) -> ExportedPackage:
        if recipients:
            raise UsageError("in-process sessions encrypt to the recipients in config.tgsp.recipients")

        def work(core: TrainingSessionCore) -> ExportedPackage:
            manifest = core.export_tgsp(path)
            return ExportedPackage(artifact_id=str(path), package_id=manifest.get("package_id"), step=core.step)

        return self._in_order(session_id, "export_tgsp", work)

    def list_sessions(self) -> list[SessionInfo]:
        return [self.info(session_id) for session_id in self.store.session_ids()]

    def generate(self, session_id: str, request: SampleRequest) -> SampleResult:
        responses = self._in_order(
            session_id,
            "generate",
            lambda core: core.generate(request.prompts, request.sampling_params, request.num_samples),
        )
        return SampleResult(responses=responses)

    def close(self) -> None:
        self.sessions.close()


class HTTPTransport:
    """Sessions on a ``tensafe serve`` server, with retries on 429, 5xx and connection errors.

    A request is sent again only when that is safe: a GET, a POST that carries
    an ``Idempotency-Key`` (session creation and queued operations), or any
    request that never reached the server. ``Retry-After`` on a 429 or 503 is
    honoured, up to ``max_retry_after`` seconds.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 120.0,
        max_retries: int = 5,
        backoff: float = 0.2,
        max_retry_after: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        try:
            import httpx
        except ImportError:
            raise MissingDependencyError(
                "talking to a TenSafe server needs httpx; install it with: "
                "python -m pip install './tensafe-core[client]'"
            ) from None
        self._httpx = httpx
        if transport is None:
            # Without TCP_NODELAY a request's header and body segments meet delayed ACKs: ~40 ms per call.
            transport = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        self._http = httpx.Client(
            base_url=base_url.rstrip("/") + "/api/v1",
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=timeout,
            transport=transport,
        )
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_retry_after = max_retry_after
        #: One lock per session, so operations from several threads reach the server in call order.
        self._order: dict[str, threading.Lock] = {}

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
        params: dict[str, str] | None = None,
    ) -> Any:
        """Send, retrying transient failures of requests safe to repeat; raise typed errors.

        ``body`` is a request model sent as JSON; ``raw`` bytes are sent as they are (uploads). Waits
        between tries follow ``Retry-After`` when the server sends one, else exponential backoff with jitter.
        """
        content = raw if raw is not None else body.model_dump_json() if body is not None else None
        kind = "application/octet-stream" if raw is not None else "application/json"
        all_headers = {"Content-Type": kind, **(headers or {})}
        repeatable = method.upper() in SAFE_METHODS or "Idempotency-Key" in all_headers
        for attempt in range(self.max_retries + 1):
            pause = self.backoff * (2**attempt) * (0.5 + random.random())
            try:
                response = self._http.request(method, path, content=content, headers=all_headers, params=params)
            except self._httpx.TransportError as exc:
                unsent = isinstance(exc, self._httpx.ConnectError | self._httpx.ConnectTimeout)
                if not (unsent or repeatable):
                    raise OperationFailed(
                        f"the connection to the TenSafe server was lost after {method} {path} was sent ({exc}); "
                        "it may have been carried out, so it is not sent again",
                        retryable=False,
                    ) from None
                if attempt == self.max_retries:
                    raise OperationFailed(f"cannot reach the TenSafe server: {exc}", retryable=True) from None
            else:
                if not self._retry(response, repeatable) or attempt == self.max_retries:
                    return self._decode(response)
                pause = self._retry_after(response, pause)
            time.sleep(pause)
        raise AssertionError("unreachable")

    def _retry(self, response: httpx.Response, repeatable: bool) -> bool:
        """Whether to send the request again: a transient status, a repeatable request, not refused for good."""
        if response.status_code not in RETRY_STATUSES or not repeatable:
            return False
        if response.headers.get("content-type", "").startswith("application/json"):
            try:
                data = response.json()
            except ValueError:
                return True
            # A 429 the server says waiting will not cure (a quota of sessions) is not retried.
            return not (isinstance(data, dict) and data.get("retryable") is False)
        return True

    def _retry_after(self, response: httpx.Response, default: float) -> float:
        """Seconds to wait before the next try: the server's Retry-After (capped) on 429/503, else ``default``."""
        value = response.headers.get("retry-after", "").strip()
        if response.status_code not in RETRY_AFTER_STATUSES or not value:
            return default
        try:
            seconds = float(value)
        except ValueError:
            from email.utils import parsedate_to_datetime

            try:
                seconds = parsedate_to_datetime(value).timestamp() - time.time()
            except (TypeError, ValueError):
                return default
        return min(max(seconds, 0.0), self.max_retry_after)

    def _decode(self, response: httpx.Response) -> Any:
        binary = response.headers.get("content-type", "").startswith("application/octet-stream")
        if binary and response.is_success:
            return response.content
        try:
            data = response.json()
        except ValueError:
            data = {"error": "bad_response", "message": response.text[:200]}
        if response.is_success:
            return data
        if not isinstance(data, dict):
            data = {"error": "bad_response", "message": str(data)[:200]}
        raise error_from(data, retryable=response.status_code in RETRY_STATUSES)

    def _lock(self, session_id: str) -> threading.Lock:
        return self._order.setdefault(session_id, threading.Lock())

    def create_training(self, spec: RemoteTrainingSessionCreate) -> SessionInfo:
        # One key for every try: a retry after a lost answer (a slow model load) returns the first session.
        key = {"Idempotency-Key": uuid.uuid4().hex}
        return SessionInfo.model_validate(self.request("POST", "/training", body=spec, headers=key))

    def models(self) -> list[ModelInfo]:
        return [ModelInfo.model_validate(m) for m in self.request("GET", "/models")]

    def tenant_keys(self) -> TenantKeys:
        return TenantKeys.model_validate(self.request("GET", "/keys"))

    def audit_receipt(self) -> AuditReceipt:
        return AuditReceipt.model_validate(self.request("GET", "/audit/receipt"))

    def upload_dataset(self, path: Path, name: str) -> DatasetInfo:
        data = self.request("POST", "/datasets", raw=_read(path), params={"name": name})
        return DatasetInfo.model_validate(data)

    def upload_package(self, path: Path, name: str) -> ExportedPackage:
        return ExportedPackage.model_validate(self.request("POST", "/packages", raw=_read(path), params={"name": name}))

    def info(self, session_id: str) -> SessionInfo:
        return SessionInfo.model_validate(self.request("GET", f"/training/{session_id}"))

    def submit(self, session_id: str, request: Queued) -> APIFuture[dict[str, Any]]:
        operation = (
            "forward_backward"
            if isinstance(request, ForwardBackwardRequest)
            else "train_step"
            if isinstance(request, TrainStepRequest)
            else "optim_step"
        )
        # The same key on every retry: the server runs a resubmitted operation once.
        key = uuid.uuid4().hex
        with self._lock(session_id):
            data = self.request(
                "POST", f"/training/{session_id}/{operation}", body=request, headers={"Idempotency-Key": key}
            )
        info = FutureInfo.model_validate(data)
        return APIFuture(info.future_id, lambda timeout: self._wait(info, timeout))

    def _wait(self, info: FutureInfo, timeout: float | None) -> dict[str, Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.05
        while info.status not in ("completed", "failed"):
            left = 30.0 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(info.future_id)
            wait = min(30.0, left)
            asked = time.monotonic()
            info = FutureInfo.model_validate(self.request("GET", f"/futures/{info.future_id}?wait={wait:.3f}"))
            if info.status not in ("completed", "failed") and time.monotonic() - asked < wait / 2:
                # The server answered at once (this tenant is at its cap of waits): back off instead of spinning.
                time.sleep(min(pause, max(0.0, left)))
                pause = min(pause * 2, 1.0)
        if info.status == "failed":
            assert info.error is not None
            raise error_from(info.error.model_dump(), retryable=info.error.retryable)
        assert info.result is not None
        return info.result

    def sample(self, session_id: str, request: SampleRequest) -> SampleResult:
        with self._lock(session_id):
            return SampleResult.model_validate(self.request("POST", f"/training/{session_id}/sample", body=request))

    def save_state(self, session_id: str, name: str | None) -> SavedState:
        with self._lock(session_id):
            data = self.request("POST", f"/training/{session_id}/save_state", body=SaveStateRequest(name=name))
        return SavedState.model_validate(data)

    def load_state(self, session_id: str, state_id: str) -> SessionInfo:
        with self._lock(session_id):
            data = self.request("POST", f"/training/{session_id}/load_state", body=LoadStateRequest(state_id=state_id))
        return SessionInfo.model_validate(data)

    def export_tgsp(self, session_id: str, path: Path, recipients: list[str]) -> ExportedPackage:
        with self._lock(session_id):
            body = ExportRequest(recipients=recipients)
            data = self.request("POST", f"/training/{session_id}/export_tgsp", body=body)
        exported = ExportedPackage.model_validate(data)
        path.write_bytes(self.request("GET", f"/packages/{exported.artifact_id}"))
        return exported

    def create_inference(self, spec: RemoteInferenceSessionCreate) -> SessionInfo:
        key = {"Idempotency-Key": uuid.uuid4().hex}
        return SessionInfo.model_validate(self.request("POST", "/inference", body=spec, headers=key))

    def list_sessions(self) -> list[SessionInfo]:
        return [SessionInfo.model_validate(info) for info in self.request("GET", "/sessions")]

    def generate(self, session_id: str, request: SampleRequest) -> SampleResult:
        with self._lock(session_id):
            data = self.request("POST", f"/inference/{session_id}/generate", body=request)
        return SampleResult.model_validate(data)

    def close(self) -> None:
        self._http.close()


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
