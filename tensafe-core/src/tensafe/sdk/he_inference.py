"""The key owner's side of HE inference on a TenSafe server: the secret key and the plaintext adapter stay here.

``client.create_he_inference_session(model=..., adapter=...)`` gives an
:class:`HEInferenceSession`. With a PEFT adapter directory this process makes
fresh CKKS keys, encrypts the adapter (:meth:`tensafe.he_lora.KeyOwner.encrypt_adapter`)
and uploads only the public parameters, the public key and the ciphertexts
(``POST /he/adapters``). With an HE-encrypted .tgsp package (``tensafe he pack``)
it opens the key owner's sealed state (``key_owner_state``, passphrase from
``$TENSAFE_HE_PASSPHRASE``) and uploads the package (``POST /packages``),
whose adapter is already ciphertexts.

:meth:`HEInferenceSession.generate` then drives the generation turn by turn:
the server answers ``POST .../generate`` with the evaluator's first masked
request, this process answers it with :meth:`KeyOwner.handle`
(``POST .../turn``), and so on until the server returns the result. Each turn
frame is checked to be bound to this session and generation, in order.
"""

from __future__ import annotations

import contextlib
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tensafe.api import (
    ExportedPackage,
    HEAdapterInfo,
    RemoteHEInferenceSessionCreate,
    SampleRequest,
    SampleResult,
    SessionConfig,
    SessionInfo,
)
from tensafe.config import HEConfig, RunConfig
from tensafe.errors import BackendError, UsageError
from tensafe.he import state as sealed_state
from tensafe.he.key_owner import KeyOwner
from tensafe.he.messages import Turn

if TYPE_CHECKING:
    from collections.abc import Sequence

    from tensafe.plugins import TensafePluginManager
    from tensafe.types import SampleResponse, SamplingParams


class Requester(Protocol):
    """What the session needs of the SDK's HTTP transport (:class:`tensafe.sdk.transports.HTTPTransport`)."""

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
        params: dict[str, str] | None = None,
    ) -> Any: ...


@dataclass
class HEGenerationStats:
    """One generation as the key owner saw it.

    ``key_owner_cpu_s``: CPU time of this thread inside :meth:`KeyOwner.handle`
    (deserialise, decrypt, sums, ``B w``, flood, serialise); ``client_cpu_s``:
    this process's CPU time over the whole generation (adds the HTTP client's
    work); ``sent`` / ``received``: turn frames' bytes to and from the server.
    """

    turns: int = 0
    sent: int = 0
    received: int = 0
    key_owner_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    wall_s: float = 0.0


class HEInferenceSession:
    """An HE inference session on a server: it evaluates, this process answers as the key owner."""

    def __init__(
        self,
        http: Requester,
        info: SessionInfo,
        key_owner: KeyOwner,
        *,
        state_file: Path | None = None,
        passphrase: str | bytes | None = None,
    ) -> None:
        self._http = http
        self.session_id = info.session_id
        self._owner = key_owner
        #: The sealed state the key owner was loaded from: its decryption count is written back after each generation.
        self._state_file = state_file
        self._passphrase = passphrase
        #: The last generation's turns, bytes and CPU time.
        self.last = HEGenerationStats()

    @property
    def key_owner(self) -> KeyOwner:
        return self._owner

    def info(self) -> SessionInfo:
        return SessionInfo.model_validate(self._http.request("GET", f"/he/sessions/{self.session_id}"))

    def generate(
        self, prompts: Sequence[str], sampling_params: SamplingParams | None = None, num_samples: int = 1
    ) -> list[SampleResponse]:
        """Generate; every round trip the evaluator needs is answered here, by the key owner."""
        request = SampleRequest(prompts=list(prompts), sampling_params=sampling_params, num_samples=num_samples)
        stats = HEGenerationStats()
        wall, cpu = time.perf_counter(), time.process_time()
        reply = self._http.request("POST", f"/he/sessions/{self.session_id}/generate", body=request)
        try:
            reply = self._answer(reply, stats)
        except BaseException:
            # Tell the server at once rather than leave its evaluator waiting out the turn timeout.
            with contextlib.suppress(Exception):
                self._http.request("DELETE", f"/he/sessions/{self.session_id}/generation")
            raise
        finally:
            self._write_back(stats)
        if not isinstance(reply, dict):
            raise BackendError("the server answered an HE generation with neither a turn nor a result")
        stats.wall_s, stats.client_cpu_s = time.perf_counter() - wall, time.process_time() - cpu
        self.last = stats
        return SampleResult.model_validate(reply).responses

    sample = generate

    def _write_back(self, stats: HEGenerationStats) -> None:
        """Keep the decryption count in the sealed state, so that the key-rotation limit holds across runs."""
        if self._state_file is not None and self._passphrase is not None and stats.turns:
            sealed_state.replace(self._state_file, self._owner.save(self._passphrase))

    def _answer(self, reply: Any, stats: HEGenerationStats) -> Any:
        """Answer turns until the server sends something else (the result)."""
        generation = None
        while isinstance(reply, bytes):
            stats.received += len(reply)
            turn = Turn.from_bytes(reply)
            if generation is None:
                generation = turn.generation_id
            turn.check(self.session_id, generation, stats.turns + 1)
            started = time.thread_time()
            answer = self._owner.handle(turn.payload)
            stats.key_owner_cpu_s += time.thread_time() - started
            frame = Turn(self.session_id, generation, turn.turn, answer).to_bytes()
            stats.sent += len(frame)
            stats.turns += 1
            reply = self._http.request("POST", f"/he/sessions/{self.session_id}/turn", raw=frame)
        return reply


def _he_backend(plugin_manager: TensafePluginManager | None, name: str) -> Any:
    from tensafe.plugins import create_plugin_manager

    pm = plugin_manager if plugin_manager is not None else create_plugin_manager()
    return pm.registry.he_backend(name)


def _package_id(adapter: ExportedPackage | str | Path) -> tuple[str | None, Path | None]:
    """(artifact id of a package already uploaded, or a local package file to upload)."""
    if isinstance(adapter, ExportedPackage):
        return adapter.artifact_id, None
    if isinstance(adapter, str) and re.fullmatch(r"[0-9a-f]{32}", adapter) and not Path(adapter).exists():
        return adapter, None
    return None, Path(adapter)


def create_he_inference_session(
    http: Requester,
    *,
    adapter: ExportedPackage | str | Path,
    model: str | None = None,
    config: RunConfig | None = None,
    key_owner_state: str | Path | None = None,
    passphrase: str | bytes | None = None,
    hiding_limit: float | None = None,
    plugin_manager: TensafePluginManager | None = None,
) -> HEInferenceSession:
    """An HE inference session on the server ``http`` reaches, this process the key owner.

    ``adapter``: a PEFT LoRA directory (encrypted here under fresh keys), an
    HE-encrypted .tgsp package file (uploaded), or a package already uploaded
    (its :class:`ExportedPackage` or artifact id); a package needs
    ``key_owner_state`` (default ``config.he.key_owner_state``) and its
    passphrase (default ``$TENSAFE_HE_PASSPHRASE``). The HE parameters and
    backend come from ``config.he`` (default :class:`HEConfig`).
    """
    config = config or RunConfig()
    he = config.he or HEConfig()
    state_file: Path | None = None
    remote = SessionConfig.from_run_config(config.model_copy(update={"he": None}), model)
    artifact, local = _package_id(adapter)
    if local is not None and local.is_dir():
        owner = KeyOwner.create(_he_backend(plugin_manager, he.backend), he)
        from tensafe.he.peft import read_peft_lora

        modules, _ = read_peft_lora(local)
        encrypted = owner.encrypt_adapter(modules)
        params = {"he_backend": he.backend, "name": local.name}
        uploaded = HEAdapterInfo.model_validate(http.request("POST", "/he/adapters", raw=encrypted, params=params))
        spec = RemoteHEInferenceSessionCreate(
            config=remote, he_backend=he.backend, adapter_id=uploaded.adapter_id, hiding_limit=hiding_limit
        )
    else:
        if local is not None and not local.is_file():
            raise UsageError(f"adapter not found (a PEFT directory or an HE-encrypted .tgsp package): {local}")
        state = key_owner_state if key_owner_state is not None else he.key_owner_state
        if state is None:
            raise UsageError(
                "an HE-encrypted package needs its key owner's state (key_owner_state=, or he.key_owner_state), "
                "the file `tensafe he pack --state` wrote"
            )
        if passphrase is None:
            passphrase = sealed_state.passphrase_from_env()
        state_file = Path(state)
        owner = KeyOwner.load(_he_backend(plugin_manager, he.backend), _read(state_file), passphrase)
        if local is not None:
            params = {"name": local.name}
            artifact = ExportedPackage.model_validate(
                http.request("POST", "/packages", raw=_read(local), params=params)
            ).artifact_id
        spec = RemoteHEInferenceSessionCreate(
            config=remote, he_backend=he.backend, package_artifact_id=artifact, hiding_limit=hiding_limit
        )
    key = {"Idempotency-Key": uuid.uuid4().hex}
    info = SessionInfo.model_validate(http.request("POST", "/he/sessions", body=spec, headers=key))
    return HEInferenceSession(http, info, owner, state_file=state_file, passphrase=passphrase)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
