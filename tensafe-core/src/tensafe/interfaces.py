"""The interfaces that registered objects are checked against.

Each is an abstract base class: a plugin subclasses it, and the registry checks
every object it creates with ``isinstance``. Optional features are declared in
``capabilities`` (see :mod:`tensafe.capabilities`); the conformance suite in
:mod:`tensafe.testing` runs the tests for each declared capability.

This module imports nothing heavy, so plugin modules may import it freely.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:
    from tensafe.config import HEConfig, RunConfig
    from tensafe.types import (
        AdamParams,
        Datum,
        ForwardBackwardOutput,
        LossFnType,
        ModelInfo,
        OptimStepResponse,
        SampleResponse,
        SamplingParams,
    )


class MLBackend(abc.ABC):
    """Loads a causal LM, trains a LoRA adapter on it, and samples from it.

    Calls happen in this order: :meth:`initialize_model` once, then any mix of
    the others. ``forward_backward`` accumulates gradients; ``optim_step``
    applies and clears them. With ``config.dp.enabled`` a backend that declares
    the ``dp_sgd`` capability clips each datum's gradient to
    ``config.dp.max_grad_norm`` and adds Gaussian noise of standard deviation
    ``noise_multiplier * max_grad_norm`` to the sum, divided by the expected
    batch size ``config.training.batch_size``.
    """

    capabilities: ClassVar[frozenset[str]] = frozenset()

    @abc.abstractmethod
    def initialize_model(self, config: RunConfig) -> ModelInfo:
        """Load ``config.model`` and attach a fresh adapter from ``config.lora``."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""

    @abc.abstractmethod
    def decode(self, tokens: Sequence[int]) -> str:
        """Text of ``tokens``."""

    @abc.abstractmethod
    def forward(
        self, data: Sequence[Datum], loss_fn: LossFnType, loss_fn_config: Mapping[str, float] | None = None
    ) -> ForwardBackwardOutput:
        """Compute the loss and per-datum logprobs without touching gradients."""

    @abc.abstractmethod
    def forward_backward(
        self, data: Sequence[Datum], loss_fn: LossFnType, loss_fn_config: Mapping[str, float] | None = None
    ) -> ForwardBackwardOutput:
        """Compute the loss and accumulate its gradients for the next ``optim_step``."""

    @abc.abstractmethod
    def optim_step(self, adam_params: AdamParams) -> OptimStepResponse:
        """Apply the accumulated gradients (clipped and noised under DP) with AdamW."""

    @abc.abstractmethod
    def sample(
        self, prompts: Sequence[Sequence[int]], sampling_params: SamplingParams, num_samples: int = 1
    ) -> list[SampleResponse]:
        """Generate ``num_samples`` continuations of each prompt with the current adapter."""

    @abc.abstractmethod
    def save_state(self) -> bytes:
        """Adapter weights, optimizer state, RNG state and step, without pickle."""

    @abc.abstractmethod
    def load_state(self, state: bytes) -> int:
        """Restore what :meth:`save_state` wrote; returns the restored step."""

    @abc.abstractmethod
    def export_adapter(self, directory: Path) -> list[Path]:
        """Write the adapter in the backend's standard format; returns the files written."""

    @abc.abstractmethod
    def load_adapter(self, directory: Path) -> None:
        """Replace the current adapter with one :meth:`export_adapter` wrote."""

    def sample_stream(self, prompt: Sequence[int], sampling_params: SamplingParams) -> Iterator[str]:
        """Yield one continuation's text as it is generated (capability ``streaming``)."""
        from tensafe.errors import BackendError

        raise BackendError(f"{type(self).__name__} does not declare the 'streaming' capability")

    def default_dataset(self) -> Path | None:
        """A JSONL dataset shipped with the backend, used when the config names none."""
        return None


class PrivacyAccountant(abc.ABC):
    """Tracks the privacy spent by a sequence of DP-SGD steps.

    Steps are Poisson-subsampled Gaussian mechanisms under the add/remove-one
    neighbouring relation. ``state()`` must be JSON-serialisable and, loaded
    into a fresh accountant with ``load_state``, give identical answers.
    """

    capabilities: ClassVar[frozenset[str]] = frozenset()

    @abc.abstractmethod
    def compose_step(self, sampling_rate: float, noise_multiplier: float, count: int = 1) -> None:
        """Record ``count`` DP-SGD steps at sampling rate ``q`` and noise multiplier ``sigma``."""

    @abc.abstractmethod
    def get_epsilon(self, delta: float) -> float:
        """Epsilon spent so far for the given delta."""

    @abc.abstractmethod
    def get_delta(self, epsilon: float) -> float:
        """Delta spent so far for the given epsilon."""

    @property
    @abc.abstractmethod
    def steps(self) -> int:
        """Number of steps composed so far."""

    @abc.abstractmethod
    def calibrate_noise_multiplier(
        self, target_epsilon: float, delta: float, sampling_rate: float, steps: int
    ) -> float:
        """Smallest noise multiplier whose epsilon after ``steps`` more steps is at most the target."""

    @abc.abstractmethod
    def state(self) -> dict[str, Any]:
        """JSON-serialisable state."""

    @abc.abstractmethod
    def load_state(self, state: Mapping[str, Any]) -> None:
        """Replace this accountant's state with ``state``."""


class HEBackend(abc.ABC):
    """A homomorphic-encryption scheme over vectors of reals (CKKS-like).

    Ciphertexts, plaintexts and keys are backend objects; they cross process
    boundaries only through the ``serialize_*`` / ``deserialize_*`` methods.
    """

    capabilities: ClassVar[frozenset[str]] = frozenset()

    @abc.abstractmethod
    def create_context(self, config: HEConfig, *, rotations: Sequence[int] = ()) -> None:
        """Create parameters and keys; Galois keys only for ``rotations``."""

    @property
    @abc.abstractmethod
    def slot_count(self) -> int:
        """How many reals one ciphertext holds."""

    @abc.abstractmethod
    def encrypt(self, values: Sequence[float]) -> Any:
        """Encode and encrypt a vector of at most ``slot_count`` reals."""

    @abc.abstractmethod
    def decrypt(self, ciphertext: Any) -> list[float]:
        """Decrypt and decode (needs the secret key)."""

    @abc.abstractmethod
    def add(self, a: Any, b: Any) -> Any:
        """Slot-wise sum of two ciphertexts."""

    @abc.abstractmethod
    def subtract(self, a: Any, b: Any) -> Any:
        """Slot-wise difference of two ciphertexts."""

    @abc.abstractmethod
    def multiply_plain(self, ciphertext: Any, values: Sequence[float]) -> Any:
        """Slot-wise product with a plaintext vector."""

    @abc.abstractmethod
    def multiply(self, a: Any, b: Any) -> Any:
        """Slot-wise product of two ciphertexts, relinearised."""

    @abc.abstractmethod
    def rescale(self, ciphertext: Any) -> Any:
        """Divide by the scale and drop one modulus level."""

    @abc.abstractmethod
    def rotate(self, ciphertext: Any, steps: int) -> Any:
        """Cyclic rotation of the slots by ``steps``."""

    @abc.abstractmethod
    def serialize_ciphertext(self, ciphertext: Any) -> bytes:
        """Bytes of a ciphertext."""

    @abc.abstractmethod
    def deserialize_ciphertext(self, data: bytes) -> Any:
        """A ciphertext from bytes, checked against this context."""


class TGSPLoader(abc.ABC):
    """Writes and opens TGSP adapter packages: signed, encrypted, carrying a privacy certificate.

    Opening always verifies first (signatures by a trusted signer, hashes,
    policy) and only then decrypts; nothing unverified reaches a model.
    """

    capabilities: ClassVar[frozenset[str]] = frozenset()

    @abc.abstractmethod
    def pack(
        self,
        source: Path,
        output: Path,
        *,
        signing_key: Path,
        recipients: Sequence[Path],
        base_model: str,
        lora_config: Mapping[str, Any] | None = None,
        privacy_certificate: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Package the adapter directory ``source`` into ``output``; returns the manifest."""

    @abc.abstractmethod
    def inspect(self, path: Path) -> dict[str, Any]:
        """The package's manifest (including its privacy certificate), unverified."""

    @abc.abstractmethod
    def verify(self, path: Path, trusted_signers: Sequence[Path]) -> dict[str, Any]:
        """Check signatures, hashes and policy without decrypting; returns the manifest."""

    @abc.abstractmethod
    def load(
        self,
        path: Path,
        *,
        recipient_key: Path,
        trusted_signers: Sequence[Path],
        destination: Path,
        allow_untrusted_signer: bool = False,
        base_model: str | None = None,
    ) -> dict[str, Any]:
        """Verify, then decrypt the adapter files into ``destination``; returns the manifest.

        ``base_model`` is the model the adapter will be applied to; the package's
        policy (allowed base models) is checked against it.

        ``allow_untrusted_signer`` accepts a package whose signatures are valid
        but whose signer is not among ``trusted_signers``: an explicit, loud
        override for the user who knows where the package came from.
        """


@runtime_checkable
class RewardFunction(Protocol):
    """Scores one completion; used by reinforcement learning with verifiable rewards."""

    def __call__(self, prompt: str, completion: str, reference: str | None) -> float: ...


#: The interface each registry kind's objects must satisfy.
INTERFACES: dict[str, type] = {
    "ml_backend": MLBackend,
    "he_backend": HEBackend,
    "accountant": PrivacyAccountant,
    "tgsp_loader": TGSPLoader,
    "reward": RewardFunction,
}
