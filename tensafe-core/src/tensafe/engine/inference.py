"""Generation: the base model with a PEFT adapter, a verified TGSP package, or HE-LoRA."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tensafe import capabilities
from tensafe.config import DPConfig, HEConfig
from tensafe.engine.packaging import open_package
from tensafe.errors import UsageError
from tensafe.he import state as sealed_state
from tensafe.he.pool import MaskPool

if TYPE_CHECKING:
    from tensafe.config import RunConfig
    from tensafe.engine.gate import StepGate
    from tensafe.he.rounds import SharedInputDeltas
    from tensafe.he_lora import Evaluator
    from tensafe.interfaces import HEBackend, MLBackend
    from tensafe.registry import Registry
    from tensafe.types import SampleResponse, SamplingParams


def sample_text(
    backend: MLBackend, prompts: Sequence[str], sampling: SamplingParams, num_samples: int = 1
) -> list[SampleResponse]:
    """Generate from text prompts with the backend's current adapter."""
    if not prompts:
        raise UsageError("no prompts given")
    return backend.sample([backend.encode(p) for p in prompts], sampling, num_samples)


@dataclass
class Inference:
    """Loads a model for generation with an adapter, a package or HE-LoRA, and generates."""

    config: RunConfig
    registry: Registry
    gate: StepGate
    #: Accept .tgsp packages whose (valid) signer is not trusted; set only on the user's explicit request.
    allow_untrusted_signer: bool = False
    #: The key owner state's passphrase (None: $TENSAFE_HE_PASSPHRASE), for an HE-encrypted package in process.
    he_passphrase: str | bytes | None = None
    #: Worker processes making the evaluator's masks ahead of time (0: masks made inline, on the token's path).
    he_mask_workers: int = 0
    #: Set while a key owner loaded from a sealed state is in use: writes its decryption count back to that state.
    _write_back: Callable[[], None] | None = field(default=None, init=False, repr=False)

    def load(self, adapter: Path | None, *, he: bool) -> tuple[MLBackend, Evaluator | None]:
        """The loaded ML backend, and with ``he`` the HE-LoRA evaluator whose deltas replace the adapter's."""
        package = adapter is not None and Path(adapter).is_file()
        if adapter is not None and not package and not Path(adapter).is_dir():
            raise UsageError(f"adapter not found (a PEFT directory or a .tgsp package): {adapter}")
        if he and adapter is None:
            raise UsageError("HE inference needs an adapter (a PEFT directory or a .tgsp package) to encrypt")
        backend = self.load_base(he=he)
        evaluator = None
        if adapter is not None and package:
            with tempfile.TemporaryDirectory(prefix="tensafe-adapter-") as scratch:
                opened = Path(scratch) / "adapter"
                manifest = open_package(
                    self.gate, self.registry, self.config, Path(adapter), opened, self.allow_untrusted_signer
                )
                marker = manifest.get("encrypted_adapter")
                if he:
                    evaluator = self._he_evaluator(backend, opened, marker)
                elif marker is not None:
                    raise UsageError("this package's adapter is HE-encrypted; run inference with HE (--he)")
                else:
                    backend.load_adapter(opened)
        elif adapter is not None and he:
            evaluator = self._he_evaluator(backend, Path(adapter), None)
        elif adapter is not None:
            backend.load_adapter(Path(adapter))
        return backend, evaluator

    def load_base(self, *, he: bool) -> MLBackend:
        """The ML backend with the base model loaded and no adapter; with ``he``, one that takes LoRA deltas."""
        backend = self.registry.ml_backend(self.config.backend)
        if he and not capabilities.has(backend, capabilities.LORA_DELTA):
            raise UsageError(f"ML backend {self.config.backend!r} cannot take LoRA deltas from HE (no 'lora_delta')")
        if he:
            self.registry.registration("he_backend", (self.config.he or HEConfig()).backend)  # before the model
        # Inference never trains, so the model is loaded without the DP-SGD machinery.
        backend.initialize_model(self.config.model_copy(update={"dp": DPConfig(enabled=False)}))
        return backend

    def he_package_adapter(self, package: Path, he_backend: str) -> bytes:
        """The HE-encrypted adapter inside a verified .tgsp package (public: ciphertexts and the public key).

        The package is verified (signature, policy) and opened with ``config.tgsp``
        before any byte of it is read; a package whose adapter is not HE-encrypted
        for ``he_backend`` is refused.
        """
        with tempfile.TemporaryDirectory(prefix="tensafe-adapter-") as scratch:
            opened = Path(scratch) / "adapter"
            manifest = open_package(self.gate, self.registry, self.config, package, opened, self.allow_untrusted_signer)
            marker = manifest.get("encrypted_adapter")
            if marker is None:
                raise UsageError("this package's adapter is not HE-encrypted (make one with `tensafe he pack`)")
            return self._encrypted_file(opened, marker, he_backend)

    @staticmethod
    def _encrypted_file(directory: Path, marker: Any, he_backend: str) -> bytes:
        from tensafe import he_lora

        if not isinstance(marker, dict) or marker.get("protocol") != he_lora.PROTOCOL:
            raise UsageError(f"the package's encrypted adapter uses an unknown protocol: {marker!r}")
        if marker.get("he_backend") != he_backend:
            raise UsageError(f"the package's adapter is encrypted for HE backend {marker.get('he_backend')!r}")
        adapter_file = directory / he_lora.ENCRYPTED_ADAPTER_FILE
        if not adapter_file.is_file():
            raise UsageError(f"the package has no {he_lora.ENCRYPTED_ADAPTER_FILE}")
        return adapter_file.read_bytes()

    def _he_evaluator(self, backend: MLBackend, directory: Path, marker: Any) -> Evaluator:
        """An in-process key owner and evaluator for the adapter in ``directory``.

        An HE-encrypted adapter (``marker`` from the package's manifest) is opened with
        the key owner's saved state (``he.key_owner_state``); a plaintext adapter is
        read by the key owner and encrypted under fresh keys.
        """
        from tensafe import he_lora

        he_config = self.config.he or HEConfig()

        def make() -> HEBackend:
            return self.registry.he_backend(he_config.backend)

        if marker is None:
            owner = he_lora.KeyOwner.create(make(), he_config)
            adapter = owner.encrypt_adapter(backend.read_lora(directory))
        else:
            adapter = self._encrypted_file(directory, marker, he_config.backend)
            if he_config.key_owner_state is None or not he_config.key_owner_state.is_file():
                raise UsageError(
                    "opening an HE-encrypted adapter in process needs the key owner's state file (he.key_owner_state)"
                )
            passphrase = self.he_passphrase
            if passphrase is None:
                passphrase = sealed_state.passphrase_from_env()
            state_file = he_config.key_owner_state
            owner = he_lora.KeyOwner.load(make(), state_file.read_bytes(), passphrase)
            sealing = passphrase
            if sealing is not None:  # a state that opened had a passphrase; keep its decryption count in it
                self._write_back = lambda: sealed_state.replace(state_file, owner.save(sealing))
        pool = None
        if self.he_mask_workers > 0:
            # The pool's workers are spawned processes: they get the backend's class, importable by reference.
            pool = MaskPool(type(make()), adapter, workers=self.he_mask_workers)
            pool.fill(list(he_lora.PadMaker(make(), adapter).modules))
        return he_lora.Evaluator(make(), adapter, he_lora.InProcessTransport(owner), pool=pool)

    def stream(self, prompt: str, *, adapter: Path | None = None, he: bool = False) -> Iterator[str]:
        """Generated text as it comes (whole, for backends without streaming).

        The backend is resolved and loaded before this returns, so errors surface
        before the first piece of text.
        """
        backend, evaluator = self.load(adapter, he=he)
        self.gate.audit("inference.generate", self.config.backend, prompts=1, adapter=str(adapter or ""), he=he)
        stack = contextlib.ExitStack()
        if evaluator is not None:
            _he_context(stack, backend, evaluator, self._write_back)
        if capabilities.has(backend, capabilities.STREAMING):
            pieces = backend.sample_stream(backend.encode(prompt), self.config.sampling)
        else:
            with stack:
                return iter([sample_text(backend, [prompt], self.config.sampling)[0].sequences[0].text])
        return _closing(pieces, stack)

    def generate(
        self,
        prompts: Sequence[str],
        *,
        adapter: Path | None = None,
        sampling: SamplingParams | None = None,
        num_samples: int = 1,
        he: bool = False,
    ) -> list[SampleResponse]:
        """Generate from the base model, with ``adapter`` (a directory or package) if given; ``he``: HE-LoRA."""
        backend, evaluator = self.load(adapter, he=he)
        self.gate.audit(
            "inference.generate", self.config.backend, prompts=len(prompts), adapter=str(adapter or ""), he=he
        )
        with contextlib.ExitStack() as stack:
            if evaluator is not None:
                _he_context(stack, backend, evaluator, self._write_back)
            return sample_text(backend, prompts, sampling or self.config.sampling, num_samples)


@contextlib.contextmanager
def he_deltas(
    backend: MLBackend, evaluator: Evaluator, *, max_answer_bytes: int | None = None
) -> Iterator[SharedInputDeltas]:
    """Run ``backend``'s base model with the evaluator's HE-LoRA deltas, modules sharing an input in one round
    (split by tokens where an answer would pass ``max_answer_bytes``)."""
    from tensafe.he.rounds import SharedInputDeltas

    deltas = SharedInputDeltas(evaluator, max_answer_bytes=max_answer_bytes)
    try:
        with backend.lora_delta(evaluator.modules, deltas):
            yield deltas
    finally:
        deltas.clear()


def _he_context(
    stack: contextlib.ExitStack, backend: MLBackend, evaluator: Evaluator, write_back: Callable[[], None] | None
) -> None:
    """Enter HE-LoRA generation on ``stack``; the evaluator's mask pool, if any, closes when the stack does, and
    ``write_back`` (the key owner's decryption count into its sealed state) runs then."""
    if write_back is not None:
        stack.callback(write_back)
    if evaluator.pool is not None:
        stack.callback(evaluator.pool.close)
    stack.enter_context(he_deltas(backend, evaluator))


def _closing(pieces: Iterator[str], stack: contextlib.ExitStack) -> Iterator[str]:
    """Yield ``pieces``, then leave ``stack`` (also when the consumer stops early)."""
    with stack:
        yield from pieces
