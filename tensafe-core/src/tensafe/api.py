"""The session API's request and response bodies, shared by the SDK and the HTTP server.

They compose the core's types (:mod:`tensafe.types`) and configuration
(:mod:`tensafe.config`); every model forbids unknown fields, so a typo in a
request is an error naming the field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from tensafe.config import DPConfig, LoraConfig, RunConfig, TrainingConfig
from tensafe.engine.ledger import PrivacyCertificate
from tensafe.types import (
    INT64_MAX,
    MAX_TOKEN_ID,
    AdamParams,
    Datum,
    LossFnType,
    SampleResponse,
    SamplingParams,
    valid_unicode,
)

#: Most data in one forward_backward request, prompts in one sample request, samples per prompt.
MAX_BATCH = 4096
MAX_PROMPTS = 256
MAX_SAMPLES = 64

FutureStatus = Literal["queued", "running", "completed", "failed"]
SessionKind = Literal["training", "inference", "he-inference"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Request(_Body):
    """A body a caller sends: NaN and infinity are refused, so every float is finite."""

    model_config = ConfigDict(allow_inf_nan=False)


def _prompt(text: str) -> str:
    return valid_unicode(text, "the prompt")


def _text(text: str) -> str:
    return valid_unicode(text, "the text")


#: A prompt: any text that is valid Unicode (JSON can escape half a surrogate pair, which no tokenizer encodes).
Prompt = Annotated[str, AfterValidator(_prompt)]
#: A name or id: valid Unicode too, as a database column stores it.
Text = Annotated[str, AfterValidator(_text)]
#: A loss option (a clipping bound, a coefficient): finite, and small enough that float32 keeps it finite.
LossOption = Annotated[float, Field(ge=-1e6, le=1e6, allow_inf_nan=False)]


class TrainingSessionCreate(_Request):
    """Start a training session: a model with a fresh LoRA adapter, trained on batches the caller supplies."""

    config: RunConfig = Field(default_factory=RunConfig, description="Model, LoRA, DP and optimizer settings.")
    sampling_rate: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Poisson sampling rate q at which the caller draws its batches; required with DP. "
        "The privacy certificate records it as declared by the caller.",
    )
    dataset_size: int | None = Field(
        None,
        ge=1,
        le=INT64_MAX,
        description="Records the caller samples from; sets the default delta 1 / (10 n).",
    )


#: A name the server operator gave a model, a dataset or a package: no path separators, no leading dot.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
#: Largest public key a request may carry (a TGSP recipient public key file is about 1.7 KiB).
MAX_PUBLIC_KEY = 16 * 1024


class ServedModel(_Request):
    """Which of the server's models to train or serve: by the name its operator registered, never a path."""

    name: str | None = Field(
        None,
        pattern=NAME_PATTERN,
        description="A model the operator registered (`tensafe serve --model NAME=PATH`; GET /api/v1/models "
        "lists them); None = the server's default model.",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights' dtype.")
    max_seq_len: int = Field(
        256, ge=2, le=MAX_TOKEN_ID, description="Longest training sequence in tokens; longer ones are cut."
    )


class SessionConfig(_Request):
    """A session's settings as a remote tenant sends them: the parts of :class:`RunConfig` that are not a
    place on the server (no model path, data file, key file or output directory)."""

    backend: str = Field("torch", pattern=NAME_PATTERN, description="Registered ML backend.")
    model: ServedModel = Field(default_factory=ServedModel)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    dp: DPConfig = Field(default_factory=DPConfig)
    optimizer: AdamParams = Field(default_factory=lambda: AdamParams(learning_rate=5e-3))
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    sampling: SamplingParams = Field(default_factory=lambda: SamplingParams(max_tokens=48, temperature=0.0))

    @classmethod
    def from_run_config(cls, config: RunConfig, model: str | None = None) -> SessionConfig:
        """The remote form of a local config; settings that name places on this machine are refused.

        A server trains and serves the models its operator registered, signs
        packages with the tenant's own server-held keys and samples only
        datasets uploaded to it, so ``model.path``, ``data``, ``tgsp`` and
        ``he`` have no meaning there: they are an error naming each setting,
        never silently dropped.
        """
        from tensafe.errors import UsageError

        local = []
        if config.model.path is not None:
            local.append("model.path (pass model='NAME', a model the server registered)")
        if config.model.device != "auto":
            local.append("model.device (the server chooses its devices)")
        if config.data.path is not None or config.data.eval_path is not None:
            local.append("data.path / data.eval_path (upload the dataset: client.upload_dataset)")
        if config.tgsp is not None:
            local.append("tgsp (the server signs with your tenant's key; name recipients in export_tgsp)")
        if config.he is not None:
            local.append("he")
        if config.mode != "sft":
            local.append("mode (sessions train step by step; rlvr runs with tensafe run)")
        if local:
            raise UsageError("not sent to a server, which has no access to your files: " + "; ".join(local))
        served = ServedModel(name=model, dtype=config.model.dtype, max_seq_len=config.model.max_seq_len)
        return cls(
            backend=config.backend,
            model=served,
            lora=config.lora,
            dp=config.dp,
            optimizer=config.optimizer,
            training=config.training,
            sampling=config.sampling,
        )


class RemoteTrainingSessionCreate(_Request):
    """Start a training session on a server: on batches the caller supplies, or on a dataset uploaded to it."""

    config: SessionConfig = Field(default_factory=SessionConfig)
    sampling_rate: float | None = Field(
        None,
        gt=0,
        le=1,
        description="With batches you supply: the Poisson rate q you draw them at; required with DP, recorded "
        "as declared by the caller. Not set with dataset_id (the server's rate is batch_size / records).",
    )
    dataset_size: int | None = Field(
        None, ge=1, le=INT64_MAX, description="Records you sample from; sets the default delta 1 / (10 n)."
    )
    dataset_id: Text | None = Field(
        None,
        max_length=64,
        description="A dataset uploaded to the server (POST /api/v1/datasets): the server then draws every "
        "batch by Poisson sampling at q = training.batch_size / records, and steps with train_step; the "
        "certificate says the batches were sampled by the server. Leave None to supply batches yourself.",
    )


class RemoteInferenceSessionCreate(_Request):
    """Serve one of the server's models, or one with an adapter from a TGSP package the tenant owns."""

    config: SessionConfig = Field(default_factory=SessionConfig)
    adapter_artifact_id: Text | None = Field(
        None, max_length=64, description="A .tgsp package artifact (exported or uploaded)."
    )


class HEAdapterInfo(_Body):
    """An HE-encrypted adapter its key owner uploaded: public parameters, public key and ciphertexts only."""

    adapter_id: str
    key_id: str = Field(description="SHA-256 prefix of the public key the adapter is encrypted under.")
    modules: list[str]
    size: int


class RemoteHEInferenceSessionCreate(_Request):
    """Serve a registered model with an adapter whose LoRA products run under CKKS: the server evaluates, the
    client, which alone holds the secret key, answers each token's masked request (``POST .../turn``).

    The adapter is EITHER an encrypted adapter uploaded to ``/he/adapters`` (``adapter_id``) OR an
    HE-encrypted TGSP package uploaded to ``/packages`` (``package_artifact_id``, made by ``tensafe he pack``).
    """

    config: SessionConfig = Field(default_factory=SessionConfig)
    he_backend: str = Field("seal-ckks", pattern=NAME_PATTERN, description="Registered HE backend.")
    adapter_id: Text | None = Field(None, max_length=64, description="An encrypted adapter (/he/adapters).")
    package_artifact_id: Text | None = Field(None, max_length=64, description="An HE-encrypted .tgsp package.")
    hiding_limit: float | None = Field(
        None, gt=0, le=1, description="Refuse answers past this statistical-distance bound on the masks' hiding."
    )

    @model_validator(mode="after")
    def _one_adapter(self) -> RemoteHEInferenceSessionCreate:
        if (self.adapter_id is None) == (self.package_artifact_id is None):
            raise ValueError("name exactly one of adapter_id (an uploaded encrypted adapter) or package_artifact_id")
        return self


class ModelInfo(_Body):
    """A model the server serves, by the name its operator gave it."""

    name: str
    default: bool


class TenantKeys(_Body):
    """The public halves of the TGSP keys the server holds for a tenant (PEM-like key files, as text)."""

    signing_public_key: str = Field(description="Verifies packages the server signs for you: trust it locally.")
    recipient_public_key: str = Field(description="Encrypt packages to it that you upload to this server.")


class DatasetInfo(_Body):
    dataset_id: str
    records: int
    name: str


class ForwardBackwardRequest(_Request):
    """Compute the loss of a batch and accumulate its gradients for the next optimizer step."""

    data: list[Datum] = Field(min_length=1, max_length=MAX_BATCH)
    loss_fn: LossFnType = "cross_entropy"
    loss_fn_config: dict[str, LossOption] | None = None


class TrainStepRequest(_Request):
    """One step on a batch the server draws from the session's dataset (sessions made with dataset_id)."""

    adam_params: AdamParams | None = Field(None, description="None = the session config's optimizer.")


class OptimStepRequest(_Request):
    """Apply the accumulated gradients; charges the privacy accountant for one step."""

    adam_params: AdamParams | None = Field(None, description="None = the session config's optimizer.")


class SampleRequest(_Request):
    """Generate continuations of text prompts with the current adapter."""

    prompts: list[Prompt] = Field(min_length=1, max_length=MAX_PROMPTS)
    sampling_params: SamplingParams | None = Field(None, description="None = the session config's sampling.")
    num_samples: int = Field(1, ge=1, le=MAX_SAMPLES)


class SampleResult(_Body):
    responses: list[SampleResponse]


class SaveStateRequest(_Request):
    name: Text | None = Field(None, max_length=200, description="A label for the saved state.")


class SavedState(_Body):
    """A saved state (adapter, optimizer and privacy spend together)."""

    state_id: str
    step: int
    epsilon: float | None


class LoadStateRequest(_Request):
    state_id: Text = Field(min_length=1, max_length=200)


class PrivacySpent(_Body):
    """What a session has spent, and what that number assumes: the fields of its privacy certificate
    (:class:`tensafe.engine.ledger.PrivacyCertificate`) that a caller needs."""

    epsilon: float
    delta: float
    steps: int
    target_epsilon: float | None
    sampling_rate: float
    noise_multiplier: float
    sampling: str = Field(description="How the batches were sampled: by the engine, or declared by the caller.")
    randomness: str = Field(description="Where the noise came from; says 'NOT private' when it was seeded.")
    accountant: str | None = Field(None, description="Registered accountant that computed epsilon.")
    max_grad_norm: float | None = Field(None, description="Per-record clipping norm C.")
    reproducible_noise: bool | None = Field(None, description="True when the noise was seeded (no guarantee).")
    mode: Literal["sft", "rlvr", "session"] | None = Field(None, description="Supervised run, RL run or session.")
    privacy_unit: str | None = Field(None, description="What one neighbouring record is.")
    neighbouring_relation: str | None = Field(None, description="What neighbouring datasets differ by.")
    caller_duties: list[str] = Field(
        default_factory=list, description="What the caller must have done for epsilon to hold."
    )
    outside_guarantee: list[str] = Field(
        default_factory=list, description="What the session releases that the guarantee does not cover."
    )

    @classmethod
    def from_certificate(cls, certificate: PrivacyCertificate) -> PrivacySpent:
        """The caller's view of a certificate (which must state q and sigma, as a session's does)."""
        return cls.model_validate(certificate.model_dump(include=set(cls.model_fields)))


class SessionInfo(_Body):
    session_id: str
    kind: SessionKind
    step: int = 0
    privacy: PrivacySpent | None = None
    pending: int = Field(0, description="Operations queued or running.")
    created: float


class ErrorInfo(_Body):
    error: str = Field(description="A stable error code.")
    message: str
    retryable: bool = False
    details: dict[str, Any] = Field(default_factory=dict)


class FutureInfo(_Body):
    """A queued operation: its status, then its result or error."""

    future_id: str
    session_id: str
    operation: Literal["forward_backward", "optim_step", "train_step"]
    status: FutureStatus
    result: dict[str, Any] | None = None
    error: ErrorInfo | None = None


class ExportRequest(_Request):
    name: Text | None = Field(None, max_length=200)
    recipients: list[Annotated[str, Field(max_length=MAX_PUBLIC_KEY)]] = Field(
        default_factory=list,
        max_length=16,
        description="Further recipients' TGSP public key files, as text (the package is always encrypted to "
        "the tenant's server-held recipient key too). Add your own to open the package off the server.",
    )


class ExportedPackage(_Body):
    artifact_id: str
    package_id: str | None
    step: int


class InferenceSessionCreate(_Request):
    """Serve a base model, or a base model with an adapter from a TGSP package the tenant owns."""

    config: RunConfig = Field(default_factory=RunConfig)
    adapter_artifact_id: Text | None = Field(None, description="A .tgsp package artifact (from export_tgsp).")


class AuditRecordInfo(_Body):
    seq: int
    time: float
    operation: str
    subject: str
    request_hash: str
    result_hash: str
    epsilon: float | None
    hash: str


class AuditReceipt(_Body):
    """The server's signed statement that a tenant's audit chain reached record ``seq`` with hash ``head``.

    Kept by the client, it shows a later cut of the chain even to whoever can
    rewrite the database and everything else on the server's disk
    (``tensafe audit verify --receipt``); only the master key can sign one.
    """

    format: Literal["tensafe-audit-receipt-1"] = "tensafe-audit-receipt-1"
    tenant_id: str = Field(max_length=64)
    seq: int = Field(ge=0, le=INT64_MAX)
    head: str = Field(max_length=128)
    time: float
    public_key: str = Field(max_length=128, description="The server's Ed25519 receipt key (base64, raw).")
    signature: str = Field(max_length=256, description="Ed25519 signature (base64) over the other fields.")


class AuditVerification(_Body):
    ok: bool
    records: int
    problems: list[str]
