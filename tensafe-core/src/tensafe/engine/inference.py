"""Generation: the base model with a PEFT adapter, a verified TGSP package, or HE-LoRA."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tensafe import capabilities
from tensafe.config import DPConfig, HEConfig
from tensafe.engine.packaging import open_package
from tensafe.errors import UsageError

if TYPE_CHECKING:
    from tensafe.config import RunConfig
    from tensafe.engine.gate import StepGate
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

    def load(self, adapter: Path | None, *, he: bool) -> tuple[MLBackend, Evaluator | None]:
        """The loaded ML backend, and with ``he`` the HE-LoRA evaluator whose deltas replace the adapter's."""
        package = adapter is not None and Path(adapter).is_file()
        if adapter is not None and not package and not Path(adapter).is_dir():
            raise UsageError(f"adapter not found (a PEFT directory or a .tgsp package): {adapter}")
        if he and adapter is None:
            raise UsageError("HE inference needs an adapter (a PEFT directory or a .tgsp package) to encrypt")
        backend = self.registry.ml_backend(self.config.backend)
        if he and not capabilities.has(backend, capabilities.LORA_DELTA):
            raise UsageError(f"ML backend {self.config.backend!r} cannot take LoRA deltas from HE (no 'lora_delta')")
        he_config = self.config.he or HEConfig()
        if he:
            self.registry.registration("he_backend", he_config.backend)  # fail before loading the model
        # Inference never trains, so the model is loaded without the DP-SGD machinery.
        backend.initialize_model(self.config.model_copy(update={"dp": DPConfig(enabled=False)}))
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
            return he_lora.in_process(make, he_config, backend.read_lora(directory))[1]
        if not isinstance(marker, dict) or marker.get("protocol") != he_lora.PROTOCOL:
            raise UsageError(f"the package's encrypted adapter uses an unknown protocol: {marker!r}")
        if marker.get("he_backend") != he_config.backend:
            raise UsageError(f"the package's adapter is encrypted for HE backend {marker.get('he_backend')!r}")
        if he_config.key_owner_state is None or not he_config.key_owner_state.is_file():
            raise UsageError(
                "opening an HE-encrypted adapter in process needs the key owner's state file (he.key_owner_state)"
            )
        adapter_file = directory / he_lora.ENCRYPTED_ADAPTER_FILE
        if not adapter_file.is_file():
            raise UsageError(f"the package has no {he_lora.ENCRYPTED_ADAPTER_FILE}")
        return he_lora.open_encrypted(make, adapter_file.read_bytes(), he_config.key_owner_state.read_bytes())

    def stream(self, prompt: str, *, adapter: Path | None = None, he: bool = False) -> Iterator[str]:
        """Generated text as it comes (whole, for backends without streaming).

        The backend is resolved and loaded before this returns, so errors surface
        before the first piece of text.
        """
        backend, evaluator = self.load(adapter, he=he)
        self.gate.audit("inference.generate", self.config.backend, prompts=1, adapter=str(adapter or ""), he=he)
        stack = contextlib.ExitStack()
        if evaluator is not None:
            stack.enter_context(backend.lora_delta(evaluator.modules, evaluator.delta))
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
                stack.enter_context(backend.lora_delta(evaluator.modules, evaluator.delta))
            return sample_text(backend, prompts, sampling or self.config.sampling, num_samples)


def _closing(pieces: Iterator[str], stack: contextlib.ExitStack) -> Iterator[str]:
    """Yield ``pieces``, then leave ``stack`` (also when the consumer stops early)."""
    with stack:
        yield from pieces
