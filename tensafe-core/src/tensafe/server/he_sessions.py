"""HE inference sessions: the server evaluates an encrypted adapter, the client holds the key and answers.

The server runs the base model and, for every group of adapted modules that read
the same input, needs one round trip to the key owner (:mod:`tensafe.he_lora`).
Only the client opens HTTP connections, so generation is driven by turns: a
``generate`` call starts the generation on the session's worker thread and
returns the evaluator's first request; each ``turn`` call carries the key
owner's answer and returns the next request, until the last call returns the
:class:`~tensafe.api.SampleResult`. Between turns the worker blocks in
:meth:`Generation.exchange` (the evaluator's :class:`~tensafe.he_lora.LoraTransport`);
a generation whose key owner does not answer within the turn timeout is
cancelled and its session's model and evaluator are freed.

Every message is a :class:`~tensafe.he.messages.Turn` frame (versioned,
size-checked) bound to the session, the generation and the turn number; an
answer is checked against the request it answers (its modules and shapes)
before the evaluator sees it. The server holds the public parameters, the public
key and the adapter's ciphertexts: never a secret key or a plaintext adapter.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tensafe.api import (
    HEAdapterInfo,
    RemoteHEInferenceSessionCreate,
    SampleRequest,
    SampleResult,
    SessionInfo,
)
from tensafe.errors import BackendError, NotFound, OperationFailed, TensafeError, UsageError
from tensafe.he.frames import REQUEST, peek_header
from tensafe.he.messages import LoraResponse, Turn
from tensafe.server import audit
from tensafe.server.db import SessionRow

if TYPE_CHECKING:
    from tensafe.config import RunConfig
    from tensafe.he.evaluator import Evaluator
    from tensafe.interfaces import HEBackend, MLBackend
    from tensafe.server.service import SessionService

#: The session kind and the artifact kind of an uploaded encrypted adapter.
KIND = "he-inference"
ADAPTER_KIND = "he-adapter"
#: Largest encrypted adapter a tenant may upload (ciphertexts of a large model's adapter).
MAX_HE_ADAPTER_BYTES = 4 * 1024**3
#: Seconds the evaluator waits for the key owner's answer (and a turn for the evaluator's next request).
TURN_TIMEOUT_S = 120.0
TURN_TIMEOUT_ENV = "TENSAFE_HE_TURN_TIMEOUT"
#: Worker processes per session making masks ahead of time (0: masks are made on the token's path).
MASK_WORKERS_ENV = "TENSAFE_HE_MASK_WORKERS"
#: Bytes an answer's frames add to its values (headers); an answer larger than its values plus this is refused.
ANSWER_SLACK = 64 * 1024
#: The largest answer one turn asks for: a longer prompt's pass takes several turns, each within the body limit.
MAX_ANSWER_BYTES = 16 * 1024 * 1024


class GenerationAbandoned(UsageError):
    """The key owner did not answer a turn in time, or cancelled the generation (a 400: the client's doing)."""

    code = "he_generation_abandoned"


class NoGeneration(UsageError):
    """A turn for a session that has no generation waiting for an answer."""

    code = "he_no_generation"


@dataclass
class _Message:
    """What the worker hands the HTTP handler: the next request frame, or the generation's end."""

    frame: bytes | None = None
    result: SampleResult | None = None
    error: BaseException | None = None


class Generation:
    """One generation's exchange between the evaluator (on the session's worker) and the key owner's turns."""

    def __init__(self, session_id: str, generation_id: str, d_out: dict[str, int], timeout: float) -> None:
        self.session_id = session_id
        self.id = generation_id
        self.timeout = timeout
        self._d_out = d_out
        self._outbox: queue.Queue[_Message] = queue.Queue()
        self._inbox: queue.Queue[bytes | None] = queue.Queue()
        self._lock = threading.Lock()
        self._answering = threading.Lock()
        #: The turn whose answer is awaited, and the shapes that answer must have.
        self.turn = 0
        self._awaiting = False
        self._expected: dict[str, tuple[int, int]] = {}
        self.finished = False
        #: Set when the key owner let a turn time out (the session is then freed, not only the generation).
        self.timed_out = False
        #: Bytes sent to and received from the key owner, and the worker's CPU seconds (for benchmarks).
        self.sent = 0
        self.received = 0
        self.worker_cpu = 0.0

    # -- the evaluator's side: its LoraTransport, on the session's worker thread --------

    def exchange(self, request: bytes) -> bytes:
        header = peek_header(REQUEST, request, "HE-LoRA request")
        try:
            expected = {str(m["module"]): (int(m["tokens"]), self._d_out[str(m["module"])]) for m in header["modules"]}
        except (KeyError, TypeError, ValueError) as exc:
            raise BackendError(f"the evaluator made a malformed request: {exc}") from None
        with self._lock:
            if self.finished:
                raise GenerationAbandoned("the generation was cancelled")
            self.turn += 1
            self._expected, self._awaiting = expected, True
            frame = Turn(self.session_id, self.id, self.turn, request).to_bytes()
        self.sent += len(frame)
        self._outbox.put(_Message(frame=frame))
        try:
            answer = self._inbox.get(timeout=self.timeout)
        except queue.Empty:
            with self._lock:
                self.timed_out, self.finished, self._awaiting = True, True, False
            raise GenerationAbandoned(
                f"the key owner did not answer turn {self.turn} within {self.timeout:g} s; the generation was "
                "cancelled (start a new one)"
            ) from None
        if answer is None:
            raise GenerationAbandoned("the generation was cancelled")
        return answer

    def finish(self, result: SampleResult | None, error: BaseException | None) -> None:
        with self._lock:
            self.finished = True
        self._outbox.put(_Message(result=result, error=error))

    # -- the key owner's side: HTTP handlers ---------------------------------------------

    def answer_limit(self) -> int:
        """The most bytes the awaited answer may have: its float64 values plus frame headers."""
        return ANSWER_SLACK + sum(8 * tokens * d_out for tokens, d_out in self._expected.values())

    def answer(self, body: bytes) -> None:
        """Take the key owner's answer to the awaited turn, once it is checked against the request it answers."""
        with self._lock:
            if not self._awaiting:
                raise NoGeneration(f"generation {self.id} is not waiting for an answer")
            turn = Turn.from_bytes(body, self.answer_limit())
            turn.check(self.session_id, self.id, self.turn)
            response = LoraResponse.from_bytes(turn.payload)
            shapes = {name: (int(v.shape[0]), int(v.shape[1])) for name, v in response.values.items()}
            if shapes != self._expected:
                raise BackendError(
                    f"the answer to turn {self.turn} has modules and shapes {shapes}, not those requested "
                    f"{self._expected}"
                )
            self._awaiting = False
        self.received += len(body)
        self._inbox.put(turn.payload)

    def respond(self, body: bytes) -> bytes | SampleResult:
        """:meth:`answer`, then :meth:`next`; one turn at a time."""
        if not self._answering.acquire(blocking=False):
            raise UsageError(f"a turn of generation {self.id} is already being answered")
        try:
            self.answer(body)
            return self.next()
        finally:
            self._answering.release()

    def next(self) -> bytes | SampleResult:
        """The evaluator's next request frame, or the result; cancels the generation if neither comes in time."""
        try:
            message = self._outbox.get(timeout=self.timeout)
        except queue.Empty:
            self.cancel()
            raise OperationFailed(
                f"the evaluator produced nothing within {self.timeout:g} s; the generation was cancelled",
                code="he_generation_timeout",
            ) from None
        if message.error is not None:
            raise message.error
        if message.frame is not None:
            return message.frame
        assert message.result is not None
        return message.result

    def cancel(self) -> None:
        with self._lock:
            self.finished = True
            self._awaiting = False
        self._inbox.put(None)


class _Relay:
    """The evaluator's transport for the whole session: the current generation's exchange."""

    def __init__(self) -> None:
        self.generation: Generation | None = None

    def exchange(self, request: bytes) -> bytes:
        if self.generation is None:
            raise GenerationAbandoned("no generation is running")
        return self.generation.exchange(request)


@dataclass
class _LiveHE:
    """An HE session loaded in this process: the base model, the evaluator and its one running generation."""

    tenant_id: str
    config: RunConfig
    backend: MLBackend
    evaluator: Evaluator
    relay: _Relay
    generation: Generation | None = None
    thread: threading.Thread | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def close(self) -> None:
        if self.generation is not None:
            self.generation.cancel()
        if self.evaluator.pool is not None:
            self.evaluator.pool.close()


class HESessions:
    """Creates, rebuilds and drives a server's HE inference sessions."""

    def __init__(
        self, service: SessionService, *, turn_timeout: float | None = None, mask_workers: int | None = None
    ) -> None:
        self.service = service
        self.turn_timeout = turn_timeout or float(os.environ.get(TURN_TIMEOUT_ENV, TURN_TIMEOUT_S))
        #: Worker processes per session making masks ahead of time (``tensafe serve --he-mask-workers``).
        self.mask_workers = mask_workers if mask_workers is not None else int(os.environ.get(MASK_WORKERS_ENV, "0"))
        #: The largest answer a turn asks for (a longer prompt's pass is split into several turns).
        self.max_answer_bytes = MAX_ANSWER_BYTES
        self._live: dict[str, _LiveHE] = {}
        self._loading = threading.Lock()

    def close(self) -> None:
        for live in list(self._live.values()):
            live.close()
        self._live.clear()

    # -- adapters ------------------------------------------------------------------------

    def _he_backend(self, name: str) -> HEBackend:
        return self.service.pm.registry.he_backend(name)

    def upload_adapter(self, tenant_id: str, path: Path, he_backend: str, name: str = "") -> HEAdapterInfo:
        """Store an encrypted adapter once it parses as one: public parameters, public key, ciphertexts at the
        protocol's level and scale, and no secret key (:class:`tensafe.he.evaluator.PadMaker` checks)."""
        from tensafe.he.evaluator import PadMaker

        data = path.read_bytes()
        try:
            maker = PadMaker(self._he_backend(he_backend), data)
        except TensafeError as exc:
            if isinstance(exc, NotFound):
                raise
            raise UsageError(f"not an encrypted HE-LoRA adapter for {he_backend!r}: {exc}") from None
        modules = sorted(maker.modules)
        with self.service.db() as db:
            meta = {"key_id": maker.key_id, "modules": modules, "he_backend": he_backend}
            adapter_id = self.service.store_artifact(db, tenant_id, ADAPTER_KIND, data, name, meta)
            info = HEAdapterInfo(adapter_id=adapter_id, key_id=maker.key_id, modules=modules, size=len(data))
            request = {"name": name, "sha256": hashlib.sha256(data).hexdigest(), "he_backend": he_backend}
            audit.append(
                db,
                self.service.keyring.audit_key,
                tenant_id,
                "he.adapter.upload",
                adapter_id,
                request,
                info.model_dump(),
            )
        return info

    def _adapter(self, tenant_id: str, spec: RemoteHEInferenceSessionCreate, config: RunConfig) -> bytes:
        """The encrypted adapter a session serves: uploaded as such, or inside a verified .tgsp package."""
        from tensafe.engine.inference import Inference
        from tensafe.orchestrator import TenSafeOrchestrator

        service = self.service
        with service.db() as db:
            if spec.adapter_id is not None:
                return service._artifact(db, tenant_id, spec.adapter_id, ADAPTER_KIND)[1]
            assert spec.package_artifact_id is not None
            _, package = service._artifact(db, tenant_id, spec.package_artifact_id, "tgsp")
        with service.tgsp.workspace() as directory, service.tgsp.files(tenant_id, directory) as keys:
            path = directory / "adapter.tgsp"
            path.write_bytes(package)
            opening = config.model_copy(update={"tgsp": service.tgsp.open_settings(keys)})
            orchestrator = TenSafeOrchestrator(opening, plugin_manager=service.pm)
            inference = Inference(orchestrator.config, orchestrator.registry, orchestrator.gate)
            try:
                return inference.he_package_adapter(path, spec.he_backend)
            except TensafeError as exc:
                if isinstance(exc, NotFound):
                    raise
                raise UsageError(f"the package cannot be served under HE: {exc}") from None

    # -- sessions ------------------------------------------------------------------------

    def _load(self, tenant_id: str, spec: RemoteHEInferenceSessionCreate) -> _LiveHE:
        """The base model and an evaluator over the session's encrypted adapter."""
        from tensafe.config import HEConfig
        from tensafe.engine.inference import Inference
        from tensafe.he.evaluator import Evaluator
        from tensafe.he.pool import MaskPool
        from tensafe.orchestrator import TenSafeOrchestrator

        config = self.service.models.run_config(spec.config, self.service.scratch)
        config = config.model_copy(update={"he": HEConfig(backend=spec.he_backend)})
        adapter = self._adapter(tenant_id, spec, config)
        relay = _Relay()
        try:
            evaluator = Evaluator(self._he_backend(spec.he_backend), adapter, relay, hiding_limit=spec.hiding_limit)
        except TensafeError as exc:
            raise UsageError(f"the encrypted adapter cannot be served: {exc}") from None
        orchestrator = TenSafeOrchestrator(config, plugin_manager=self.service.pm)
        backend = Inference(orchestrator.config, orchestrator.registry, orchestrator.gate).load_base(he=True)
        if self.mask_workers > 0:
            evaluator.pool = MaskPool(type(evaluator.backend), adapter, workers=self.mask_workers)
            evaluator.pool.fill(list(evaluator.modules))
        return _LiveHE(tenant_id, config, backend, evaluator, relay)

    def create(self, tenant_id: str, spec: RemoteHEInferenceSessionCreate) -> SessionInfo:
        session_id = self.service.new_id()
        live = self._load(tenant_id, spec)
        with self.service.db() as db:
            row = SessionRow(
                id=session_id, tenant_id=tenant_id, kind=KIND, spec=spec.model_dump_json(), created=time.time()
            )
            db.add(row)
            result = {"key_id": live.evaluator.key_id, "modules": sorted(live.evaluator.modules)}
            audit.append(
                db,
                self.service.keyring.audit_key,
                tenant_id,
                "inference.he.create",
                session_id,
                spec.model_dump(mode="json"),
                result,
            )
            info = self.service._info(row)
        self._live[session_id] = live
        return info

    def info(self, tenant_id: str, session_id: str) -> SessionInfo:
        with self.service.db() as db:
            return self.service._info(self.service._row(db, tenant_id, session_id, KIND))

    def _session(self, tenant_id: str, session_id: str) -> _LiveHE:
        """The tenant's HE session, loaded here; another tenant's id is answered exactly as an absent one."""
        with self.service.db() as db:
            row = self.service._row(db, tenant_id, session_id, KIND)
            spec = RemoteHEInferenceSessionCreate.model_validate_json(row.spec)
        live = self._live.get(session_id)
        if live is None:
            with self._loading:
                live = self._live.get(session_id)
                if live is None:
                    live = self._load(tenant_id, spec)
                    self._live[session_id] = live
        return live

    # -- generation ----------------------------------------------------------------------

    def generate(self, tenant_id: str, session_id: str, request: SampleRequest) -> bytes | SampleResult:
        """Start a generation; its first request frame (or, with nothing to ask, its result)."""
        live = self._session(tenant_id, session_id)
        with live.lock:
            if live.generation is not None and not live.generation.finished:
                raise UsageError(
                    f"session {session_id} is already generating (generation {live.generation.id}): answer its "
                    "turns, or wait for its timeout"
                )
            if live.thread is not None:
                live.thread.join(self.turn_timeout)  # a cancelled generation's worker stops at its next turn
            d_out = {name: module.spec.d_out for name, module in live.evaluator.modules.items()}
            generation = Generation(session_id, self.service.new_id(), d_out, self.turn_timeout)
            live.generation = generation
            live.relay.generation = generation
            with self.service.db() as db:
                audited = {"prompts": len(request.prompts), "num_samples": request.num_samples}
                audit.append(
                    db,
                    self.service.keyring.audit_key,
                    tenant_id,
                    "inference.he.generate",
                    session_id,
                    {**audited, "generation": generation.id},
                    {},
                )
            live.thread = threading.Thread(
                target=self._run, args=(session_id, live, generation, request), daemon=True, name="tensafe-he"
            )
            live.thread.start()
        return generation.next()

    def _run(self, session_id: str, live: _LiveHE, generation: Generation, request: SampleRequest) -> None:
        """The generation, on its own thread: the base model with the evaluator's deltas."""
        from tensafe.engine.inference import he_deltas, sample_text

        started = time.thread_time()
        result, error = None, None
        try:
            sampling = request.sampling_params or live.config.sampling
            with he_deltas(live.backend, live.evaluator, max_answer_bytes=self.max_answer_bytes):
                responses = sample_text(live.backend, request.prompts, sampling, request.num_samples)
            result = SampleResult(responses=responses)
        except BaseException as exc:  # handed to the waiting HTTP handler, which raises it there
            error = exc
        generation.worker_cpu = time.thread_time() - started
        if generation.timed_out:
            self._free(session_id, live)
        generation.finish(result, error)

    def _free(self, session_id: str, live: _LiveHE) -> None:
        """Drop an abandoned generation's session from memory (it is rebuilt from its spec on the next call)."""
        if self._live.get(session_id) is live:
            del self._live[session_id]
        with contextlib.suppress(Exception):
            live.close()

    def turn(self, tenant_id: str, session_id: str, body: bytes) -> bytes | SampleResult:
        """Hand the key owner's answer to the waiting evaluator; the next request frame, or the result."""
        live = self._session(tenant_id, session_id)
        generation = live.generation
        if generation is None or generation.finished:
            raise NoGeneration(f"session {session_id} has no generation waiting for an answer")
        return generation.respond(body)

    def cancel(self, tenant_id: str, session_id: str) -> None:
        """Cancel the session's running generation, if any (the key owner gave up on it)."""
        live = self._session(tenant_id, session_id)
        if live.generation is not None and not live.generation.finished:
            live.generation.cancel()

    def stats(self, tenant_id: str, session_id: str) -> dict[str, Any]:
        """The last generation's bytes and worker CPU time, and the session's hiding bound (for benchmarks)."""
        live = self._session(tenant_id, session_id)
        generation = live.generation
        return {
            "turns": 0 if generation is None else generation.turn,
            "sent": 0 if generation is None else generation.sent,
            "received": 0 if generation is None else generation.received,
            "worker_cpu_s": 0.0 if generation is None else generation.worker_cpu,
            "hiding": live.evaluator.hiding.report(),
        }
