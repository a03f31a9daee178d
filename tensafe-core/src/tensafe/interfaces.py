"""The interfaces that registered objects are checked against.

Each is an abstract base class: a plugin subclasses it, and the registry checks
every object it creates with ``isinstance``. Optional features are declared in
``capabilities`` (see :mod:`tensafe.capabilities`); the conformance suite in
:mod:`tensafe.testing` runs the tests for each declared capability.

This module imports nothing heavy, so plugin modules may import it freely.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, TypeAlias, runtime_checkable

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

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
        """Adapter weights, optimizer state, sampling RNG state and step, without pickle.

        Never the DP noise generator's state: whoever holds a saved state must not
        be able to regenerate past or future noise. After :meth:`load_state` a DP
        backend with ``dp.secure_rng`` draws noise from a freshly seeded CSPRNG.
        """

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

    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> tuple[list[int], list[bool]]:
        """A conversation rendered with the model's chat template (capability ``chat_template``).

        ``messages`` are ``{"role": "system" | "user" | "assistant", "content": str}``.
        Returns the token ids and, for each, whether it belongs to an assistant
        turn: training counts the loss on those tokens only.
        """
        from tensafe.errors import BackendError

        raise BackendError(f"{type(self).__name__} does not declare the 'chat_template' capability")

    def default_probes(self) -> list[str]:
        """Public prompts (not records) that suit :meth:`default_dataset`, for samples shown before and after."""
        return []

    def noised_gradient(self) -> list[float]:
        """The gradient the last DP ``optim_step`` handed to the optimizer (capability ``dp_probe``).

        All trainable parameters flattened in a fixed order, after per-sample
        clipping, the noise and the division by the expected batch size: what
        the privacy guarantee covers, nothing earlier. The conformance suite
        uses it to check clipping and noise statistically.
        """
        from tensafe.errors import BackendError

        raise BackendError(f"{type(self).__name__} does not declare the 'dp_probe' capability")

    def forward_backward_canaries(self, coordinates: Sequence[int], norm: float) -> None:
        """Accumulate Dirac canaries: per coordinate, one datum whose gradient is ``norm`` there and 0 elsewhere.

        Capability ``gradient_canaries``. ``coordinates`` index the trainable
        parameters in :meth:`noised_gradient`'s order. Each canary is one datum:
        clipped to ``dp.max_grad_norm`` like any other (its norm is ``norm``) and
        applied by the next DP ``optim_step``. A white-box privacy audit reads
        what the noised gradient shows at these coordinates.
        """
        from tensafe.errors import BackendError

        raise BackendError(f"{type(self).__name__} does not declare the 'gradient_canaries' capability")

    def join_workers(self, config: RunConfig) -> WorkerGroup:
        """Join the worker processes a launcher started for one run (capability ``distributed``).

        Called before :meth:`initialize_model`, in every worker, with the same
        ``config``. The launcher (torchrun, or ``tensafe run --nproc-per-node``)
        describes the group in the environment. Afterwards each worker trains on
        its own records, and ``optim_step`` sums the clipped per-datum gradients
        of all workers, adds the Gaussian noise once to that sum (not once per
        worker), divides by the global expected batch size and applies the same
        update on every worker. ``save_state`` holds the global state, which is
        the same on every worker; a collective that waits longer than
        ``training.worker_timeout_s`` fails the step.
        """
        from tensafe.errors import BackendError

        raise BackendError(f"{type(self).__name__} does not declare the 'distributed' capability")

    def read_lora(self, directory: Path) -> dict[str, tuple[Any, Any, float]]:
        """``{module name: (A, B, scaling)}`` of an exported adapter, without loading it (capability ``lora_delta``).

        A is ``rank x d_in``, B is ``d_out x rank``; the module's output gains ``scaling * B @ A @ x``.
        """
        from tensafe.errors import BackendError

        raise BackendError(f"{type(self).__name__} does not declare the 'lora_delta' capability")

    def lora_delta(
        self, modules: Collection[str], delta: Callable[[str, Any], Any]
    ) -> contextlib.AbstractContextManager[None]:
        """Within the context, run the base model alone with ``delta(module, x)`` added to each of ``modules``.

        ``x`` is a ``tokens x d_in`` float64 array of the module's inputs; ``delta``
        returns ``tokens x d_out``. The backend's own adapter is disabled meanwhile
        (capability ``lora_delta``).
        """
        from tensafe.errors import BackendError

        raise BackendError(f"{type(self).__name__} does not declare the 'lora_delta' capability")


@runtime_checkable
class WorkerGroup(Protocol):
    """The worker processes of one distributed run, as the engine sees them.

    Rank 0 is the leader: it alone asks the veto hooks and the privacy budget,
    charges the accountant and writes what leaves the run. Every call is a
    collective: all workers make it, in the same order.
    """

    @property
    def rank(self) -> int:
        """This worker's rank, 0 to ``world_size - 1``."""

    @property
    def world_size(self) -> int:
        """How many workers the run has."""

    def broadcast(self, value: Any) -> Any:
        """The leader's ``value`` (JSON-serialisable), on every worker."""

    def sum(self, values: Sequence[float]) -> list[float]:
        """The element-wise sum of every worker's ``values`` (all of one length), on every worker."""

    def close(self) -> None:
        """Leave the group (no collective may follow)."""


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

    One backend object holds one context: its parameters and whichever keys it
    has. A key owner creates them (:meth:`create_context`); an evaluator loads
    the public parameters and the public and evaluation keys only
    (:meth:`load_context`, :meth:`load_key`), so it can compute on ciphertexts
    but never decrypt. Ciphertexts, keys and contexts cross process boundaries
    only as bytes, through the ``serialize_*`` / ``load_*`` / ``deserialize_*``
    methods, which check bytes (form, integrity, matching context) before the
    underlying library sees them. Every failure is a :class:`tensafe.errors.TensafeError`.

    Levels count the data primes a ciphertext has left (1 = the last level):
    :meth:`rescale` and :meth:`mod_switch` each drop one. ``scale_bits``
    arguments choose an encoding scale other than the context's default, which
    the LoRA protocol (:mod:`tensafe.he_lora`) uses to keep precision without
    rotations. A rotation needs a Galois key for its step: generate only the
    steps a computation uses.
    """

    capabilities: ClassVar[frozenset[str]] = frozenset()

    # -- context and keys ---------------------------------------------------------

    @abc.abstractmethod
    def create_context(self, config: HEConfig, *, rotations: Sequence[int] = (), relinearization: bool = True) -> None:
        """Create parameters and keys: public, secret, relinearisation (if asked) and Galois keys for ``rotations``.

        Parameters that fall short of 128-bit security raise :class:`tensafe.errors.ConfigError`.
        """

    @abc.abstractmethod
    def load_context(self, data: bytes) -> None:
        """Load public parameters written by :meth:`serialize_context`; no keys yet."""

    @abc.abstractmethod
    def serialize_context(self) -> bytes:
        """The public parameters (never a key)."""

    @abc.abstractmethod
    def serialize_key(self, kind: KeyKind) -> bytes:
        """One key, by kind: ``public``, ``secret``, ``relinearization`` or ``galois``."""

    @abc.abstractmethod
    def load_key(self, kind: KeyKind, data: bytes) -> None:
        """Load one key written by :meth:`serialize_key` for this context."""

    @abc.abstractmethod
    def has_key(self, kind: KeyKind) -> bool:
        """Whether this context holds a key of ``kind``."""

    @property
    @abc.abstractmethod
    def slot_count(self) -> int:
        """How many reals one ciphertext holds."""

    @property
    @abc.abstractmethod
    def top_level(self) -> int:
        """The level of a fresh ciphertext (the number of data primes)."""

    @abc.abstractmethod
    def modulus_bits(self, level: int) -> int:
        """Bits of the coefficient modulus a ciphertext at ``level`` has."""

    @abc.abstractmethod
    def level(self, ciphertext: Any) -> int:
        """How many data primes ``ciphertext`` has left."""

    @abc.abstractmethod
    def scale_bits(self, ciphertext: Any) -> float:
        """log2 of the scale ``ciphertext`` is encoded at."""

    # -- encryption ---------------------------------------------------------------

    @abc.abstractmethod
    def encrypt(self, values: RealVector, *, scale_bits: int | None = None, imaginary: RealVector | None = None) -> Any:
        """Encode and encrypt a vector of at most ``slot_count`` reals with the public key (fresh randomness).

        CKKS slots are complex; ``imaginary`` sets their imaginary parts (default 0).
        :meth:`decrypt` returns the real parts.
        """

    @abc.abstractmethod
    def encode(self, values: RealVector, *, scale_bits: float | None = None, level: int | None = None) -> Any:
        """A plaintext for :meth:`add_plain` / :meth:`multiply_plain`, to reuse one encoding many times.

        ``scale_bits`` defaults to the context's scale, ``level`` to :attr:`top_level`.
        """

    @abc.abstractmethod
    def decrypt(self, ciphertext: Any) -> NDArray[np.float64]:
        """Decrypt and decode all ``slot_count`` slots (needs the secret key)."""

    # -- arithmetic ---------------------------------------------------------------

    @abc.abstractmethod
    def add(self, a: Any, b: Any) -> Any:
        """Slot-wise sum of two ciphertexts at the same level and scale."""

    @abc.abstractmethod
    def subtract(self, a: Any, b: Any) -> Any:
        """Slot-wise difference of two ciphertexts at the same level and scale."""

    @abc.abstractmethod
    def add_plain(self, ciphertext: Any, values: RealVector | Any) -> Any:
        """Slot-wise sum with a vector (encoded at the ciphertext's level and scale) or a matching plaintext."""

    @abc.abstractmethod
    def multiply_plain(self, ciphertext: Any, values: RealVector | Any, *, scale_bits: int | None = None) -> Any:
        """Slot-wise product with a vector or a plaintext from :meth:`encode` (no rescale: the scales multiply)."""

    @abc.abstractmethod
    def multiply(self, a: Any, b: Any) -> Any:
        """Slot-wise product of two ciphertexts, relinearised (needs the relinearisation key); no rescale."""

    @abc.abstractmethod
    def rescale(self, ciphertext: Any) -> Any:
        """Divide by the last data prime and drop it (one level down)."""

    @abc.abstractmethod
    def mod_switch(self, ciphertext: Any) -> Any:
        """Drop the last data prime without changing the scale (one level down, fewer bytes)."""

    @abc.abstractmethod
    def rotate(self, ciphertext: Any, steps: int) -> Any:
        """Cyclic rotation of the slots by ``steps`` (needs the Galois key for ``steps``)."""

    @abc.abstractmethod
    def sum_slots(self, ciphertext: Any) -> Any:
        """Every slot set to the sum of all slots (rotations by powers of two; see :func:`slot_sum_rotations`)."""

    # -- bytes --------------------------------------------------------------------

    @abc.abstractmethod
    def serialize_ciphertext(self, ciphertext: Any) -> bytes:
        """Bytes of a ciphertext, bound to this context."""

    @abc.abstractmethod
    def deserialize_ciphertext(self, data: bytes) -> Any:
        """A ciphertext from bytes, checked against this context before use."""


#: The key kinds an :class:`HEBackend` serialises separately.
KeyKind = Literal["public", "secret", "relinearization", "galois"]
KEY_KINDS: tuple[KeyKind, ...] = ("public", "secret", "relinearization", "galois")
#: What an evaluator may hold: everything but the secret key.
EVALUATION_KEY_KINDS: tuple[KeyKind, ...] = ("public", "relinearization", "galois")
#: A vector of reals: a sequence of floats or a one-dimensional numpy array.
RealVector: TypeAlias = "Sequence[float] | NDArray[np.float64]"


def slot_sum_rotations(slot_count: int) -> list[int]:
    """The rotation steps :meth:`HEBackend.sum_slots` needs: the powers of two below ``slot_count``."""
    steps, step = [], 1
    while step < slot_count:
        steps.append(step)
        step *= 2
    return steps


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

    def keygen(self, directory: Path, name: str) -> dict[str, Path]:
        """Write a new key set ``name`` into ``directory`` (capability ``tgsp_keygen``).

        Returns the paths of ``signing_key``, ``signing_public_key``,
        ``recipient_key`` and ``recipient_public_key``; private key files are 0600.
        """
        from tensafe.errors import UsageError

        raise UsageError(f"TGSP loader {type(self).__name__} cannot create keys (no 'tgsp_keygen' capability)")


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
