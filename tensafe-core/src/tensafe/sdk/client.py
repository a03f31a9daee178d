"""``TenSafeClient``: training and inference sessions, in this process or on a TenSafe server.

``TenSafeClient()`` runs sessions in-process on the installed backends;
``TenSafeClient(base_url, api_key)`` runs them on ``tensafe serve``. Both give
the same :class:`TrainingSession` and :class:`InferenceSession`, built on the
same orchestrator code, with the same types and errors.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tensafe.api import (
    AuditReceipt,
    DatasetInfo,
    ExportedPackage,
    ForwardBackwardRequest,
    InferenceSessionCreate,
    ModelInfo,
    OptimStepRequest,
    PrivacySpent,
    RemoteInferenceSessionCreate,
    RemoteTrainingSessionCreate,
    SampleRequest,
    SavedState,
    SessionConfig,
    SessionInfo,
    TenantKeys,
    TrainingSessionCreate,
    TrainStepRequest,
)
from tensafe.config import RunConfig
from tensafe.errors import NotFound, UsageError
from tensafe.sdk.futures import APIFuture
from tensafe.sdk.transports import HTTPTransport, InProcessTransport, Transport
from tensafe.types import (
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    LossFnType,
    OptimStepResponse,
    SampleResponse,
    SamplingParams,
)

if TYPE_CHECKING:
    import httpx

    from tensafe.plugins import TensafePluginManager
    from tensafe.sdk.he_inference import HEInferenceSession


class _Typed(APIFuture[Any]):
    """A future whose raw JSON-ready result is parsed into a core type."""

    def __init__(self, raw: APIFuture[dict[str, Any]], parse: Any) -> None:
        super().__init__(raw.future_id, lambda timeout: parse(raw.result(timeout)))


class TrainingSession:
    """A LoRA adapter trained step by step on batches you supply (the Tinker-style API).

    ``forward_backward`` and ``optim_step`` queue work and return futures; a
    session runs its operations in the order they were submitted.
    """

    def __init__(self, transport: Transport, info: SessionInfo) -> None:
        self._transport = transport
        self.session_id = info.session_id

    def forward_backward(
        self,
        data: Sequence[Datum],
        loss_fn: LossFnType = "cross_entropy",
        loss_fn_config: dict[str, float] | None = None,
    ) -> APIFuture[ForwardBackwardOutput]:
        """Compute the loss and accumulate gradients for the next :meth:`optim_step`."""
        request = ForwardBackwardRequest(data=list(data), loss_fn=loss_fn, loss_fn_config=loss_fn_config)
        return _Typed(self._transport.submit(self.session_id, request), ForwardBackwardOutput.model_validate)

    def optim_step(self, adam_params: AdamParams | None = None) -> APIFuture[OptimStepResponse]:
        """Apply the gradients; the result's metrics carry the epsilon spent so far.

        Under DP, call it for every batch you draw, an empty Poisson batch
        included: with nothing accumulated the step applies the noise alone and
        is charged like any other (the accountant assumes it happens). Without
        DP an empty step is refused. Fails with :class:`PrivacyBudgetExceeded`
        (and changes nothing) if the step would take the session past its budget.
        """
        request = OptimStepRequest(adam_params=adam_params)
        return _Typed(self._transport.submit(self.session_id, request), OptimStepResponse.model_validate)

    def train_step(self, adam_params: AdamParams | None = None) -> APIFuture[OptimStepResponse]:
        """One step on a batch the session Poisson-samples from its dataset (sessions made with ``dataset=``).

        Under DP the result's metrics carry the epsilon spent and nothing
        computed from the batch; the certificate says the batches were
        sampled by the server (or by this process), with no duties left to you.
        """
        request = TrainStepRequest(adam_params=adam_params)
        return _Typed(self._transport.submit(self.session_id, request), OptimStepResponse.model_validate)

    def sample(
        self, prompts: Sequence[str], sampling_params: SamplingParams | None = None, num_samples: int = 1
    ) -> list[SampleResponse]:
        """Generate from text prompts with the adapter as it is after every operation submitted so far."""
        request = SampleRequest(prompts=list(prompts), sampling_params=sampling_params, num_samples=num_samples)
        return self._transport.sample(self.session_id, request).responses

    def save_state(self, name: str | None = None) -> SavedState:
        """Save adapter, optimizer and privacy spend together."""
        return self._transport.save_state(self.session_id, name)

    def load_state(self, state: SavedState | str) -> SessionInfo:
        """Restore a saved state's weights; the privacy spent never goes down."""
        return self._transport.load_state(self.session_id, state if isinstance(state, str) else state.state_id)

    def info(self) -> SessionInfo:
        return self._transport.info(self.session_id)

    def privacy_spent(self) -> PrivacySpent | None:
        """Epsilon, delta and what they assume (sampling, randomness, privacy unit, your duties);
        None for a session without DP."""
        return self.info().privacy

    def export_tgsp(self, path: str | Path, recipients: Sequence[str | Path] = ()) -> ExportedPackage:
        """Write the adapter as a signed, encrypted TGSP package to ``path``.

        In-process the keys come from the session config (``tgsp``). On a
        server the package is signed with your tenant's server-held key and
        encrypted to your tenant's server-held recipient key and to
        ``recipients`` (public key files): add your own to open it elsewhere.
        """
        texts = [_key_text(Path(p)) for p in recipients]
        return self._transport.export_tgsp(self.session_id, Path(path), texts)


class InferenceSession:
    """Generation from a base model, or from a base model with a verified TGSP adapter."""

    def __init__(self, transport: Transport, info: SessionInfo) -> None:
        self._transport = transport
        self.session_id = info.session_id

    def generate(
        self, prompts: Sequence[str], sampling_params: SamplingParams | None = None, num_samples: int = 1
    ) -> list[SampleResponse]:
        request = SampleRequest(prompts=list(prompts), sampling_params=sampling_params, num_samples=num_samples)
        return self._transport.generate(self.session_id, request).responses

    sample = generate


class TenSafeClient:
    """Entry point of the SDK: in-process without arguments, remote with a server URL and an API key."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        plugin_manager: TensafePluginManager | None = None,
        timeout: float = 120.0,
        max_retries: int = 5,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if base_url is None:
            if api_key is not None:
                raise UsageError("an API key needs a server: TenSafeClient(base_url, api_key)")
            self._transport: InProcessTransport | HTTPTransport = InProcessTransport(plugin_manager)
        else:
            if not api_key:
                raise UsageError("a TenSafe server needs an API key: TenSafeClient(base_url, api_key)")
            self._transport = HTTPTransport(
                base_url, api_key, timeout=timeout, max_retries=max_retries, transport=transport
            )

    @property
    def remote(self) -> bool:
        return isinstance(self._transport, HTTPTransport)

    def create_training_session(
        self,
        config: RunConfig | None = None,
        *,
        model: str | None = None,
        dataset: DatasetInfo | str | Path | None = None,
        sampling_rate: float | None = None,
        dataset_size: int | None = None,
    ) -> TrainingSession:
        """A fresh adapter on a base model.

        ``model``: on a server, the name of one of its models (:meth:`models`);
        in-process, a local directory (the same as ``config.model.path``).

        With ``dataset`` (a JSONL file, or on a server a dataset already
        uploaded) the session draws every batch itself by Poisson sampling at
        ``training.batch_size / records``: call :meth:`TrainingSession.train_step`.
        Without it you supply the batches; with DP, declare the Poisson rate
        you draw them at (``sampling_rate``).
        """
        config = config or RunConfig()
        if isinstance(self._transport, HTTPTransport):
            dataset_id = None
            if dataset is not None:
                dataset_id = self._dataset_id(dataset)
            remote = RemoteTrainingSessionCreate(
                config=SessionConfig.from_run_config(config, model),
                sampling_rate=sampling_rate,
                dataset_size=dataset_size,
                dataset_id=dataset_id,
            )
            return TrainingSession(self._transport, self._transport.create_training(remote))
        if model is not None:
            config = config.model_copy(update={"model": config.model.model_copy(update={"path": model})})
        if isinstance(dataset, DatasetInfo):
            raise UsageError("an uploaded dataset lives on its server; in-process, pass the JSONL file's path")
        spec = TrainingSessionCreate(config=config, sampling_rate=sampling_rate, dataset_size=dataset_size)
        local = None if dataset is None else Path(dataset)
        return TrainingSession(self._transport, self._transport.create_training(spec, local))

    def training_session(self, session_id: str) -> TrainingSession:
        """Attach to an existing training session: after this client restarted, or through another replica
        of the same server. Its adapter, optimizer and privacy spend are those last committed."""
        info = self._transport.info(session_id)
        if info.kind != "training":
            raise NotFound(f"no training session {session_id}")
        return TrainingSession(self._transport, info)

    def inference_session(self, session_id: str) -> InferenceSession:
        """Attach to an existing inference session."""
        info = self._transport.info(session_id)
        if info.kind != "inference":
            raise NotFound(f"no inference session {session_id}")
        return InferenceSession(self._transport, info)

    def list_sessions(self) -> list[SessionInfo]:
        """Your sessions, oldest first (on a server: every session of your tenant)."""
        return self._transport.list_sessions()

    def _dataset_id(self, dataset: DatasetInfo | str | Path) -> str:
        if isinstance(dataset, DatasetInfo):
            return dataset.dataset_id
        if isinstance(dataset, str) and re.fullmatch(r"[0-9a-f]{32}", dataset):
            return dataset
        return self.upload_dataset(Path(dataset)).dataset_id

    def upload_dataset(self, path: str | Path, name: str | None = None) -> DatasetInfo:
        """Upload a JSONL dataset to the server (kept encrypted under your tenant key)."""
        http = self._remote("upload_dataset")
        return http.upload_dataset(Path(path), name if name is not None else Path(path).name)

    def upload_package(self, path: str | Path, name: str | None = None) -> ExportedPackage:
        """Upload a TGSP package; the server keeps it only if it verifies (signer it trusts, encrypted to
        your tenant's recipient key, :meth:`tenant_keys`). Serve it with ``create_inference_session``."""
        http = self._remote("upload_package")
        return http.upload_package(Path(path), name if name is not None else Path(path).name)

    def models(self) -> list[ModelInfo]:
        """The server's models, by the names its operator registered."""
        return self._remote("models").models()

    def tenant_keys(self) -> TenantKeys:
        """The public halves of the TGSP keys the server holds for you: trust the signing key locally,
        encrypt packages you upload to the recipient key."""
        return self._remote("tenant_keys").tenant_keys()

    def audit_receipt(self) -> AuditReceipt:
        """A receipt, signed by the server, for your audit chain as it stands. Save it
        (``receipt.model_dump_json()``): ``tensafe audit verify --receipt FILE`` on the server then fails if
        the chain was ever cut or rewritten below it, even by someone who rewrote the server's whole disk."""
        return self._remote("audit_receipt").audit_receipt()

    def _remote(self, what: str) -> HTTPTransport:
        if not isinstance(self._transport, HTTPTransport):
            raise UsageError(f"{what} is for a TenSafe server: TenSafeClient(base_url, api_key)")
        return self._transport

    def create_inference_session(
        self,
        config: RunConfig | None = None,
        *,
        model: str | None = None,
        adapter: ExportedPackage | str | Path | None = None,
    ) -> InferenceSession:
        """Serve a base model (``model`` as in :meth:`create_training_session`), with an adapter: in-process
        a path (PEFT directory or .tgsp), remotely a package on the server (exported or uploaded: the
        :class:`ExportedPackage` or its artifact id)."""
        config = config or RunConfig()
        if isinstance(self._transport, HTTPTransport):
            if isinstance(adapter, Path):
                raise UsageError("a server opens only packages it holds: upload_package first")
            artifact = adapter.artifact_id if isinstance(adapter, ExportedPackage) else adapter
            remote = RemoteInferenceSessionCreate(
                config=SessionConfig.from_run_config(config, model), adapter_artifact_id=artifact
            )
            return InferenceSession(self._transport, self._transport.create_inference(remote))
        if model is not None:
            config = config.model_copy(update={"model": config.model.model_copy(update={"path": model})})
        path = Path(adapter.artifact_id) if isinstance(adapter, ExportedPackage) else adapter
        spec = InferenceSessionCreate(config=config)
        return InferenceSession(
            self._transport, self._transport.create_inference(spec, None if path is None else Path(path))
        )

    def create_he_inference_session(
        self,
        config: RunConfig | None = None,
        *,
        model: str | None = None,
        adapter: ExportedPackage | str | Path,
        key_owner_state: str | Path | None = None,
        passphrase: str | bytes | None = None,
        hiding_limit: float | None = None,
        plugin_manager: TensafePluginManager | None = None,
    ) -> HEInferenceSession:
        """Serve ``model`` on the server with ``adapter``'s LoRA products under CKKS, this process the key owner:
        the secret key and the plaintext adapter never leave it (:mod:`tensafe.sdk.he_inference`).

        ``adapter``: a PEFT directory (encrypted here under fresh keys), an HE-encrypted .tgsp package
        (``tensafe he pack``; opened with ``key_owner_state`` and ``passphrase`` or ``$TENSAFE_HE_PASSPHRASE``),
        or such a package already uploaded.
        """
        from tensafe.sdk.he_inference import create_he_inference_session

        return create_he_inference_session(
            self._remote("create_he_inference_session"),
            adapter=adapter,
            model=model,
            config=config,
            key_owner_state=key_owner_state,
            passphrase=passphrase,
            hiding_limit=hiding_limit,
            plugin_manager=plugin_manager,
        )

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> TenSafeClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _key_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read public key file {path}: {exc}") from None
