"""HE-LoRA in the torch backend: an adapter's LoRA factors, and the base model run with deltas from a callback."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import torch

from tensafe.errors import BackendError, UsageError


class LoraDeltaMixin:
    """``read_lora`` and ``lora_delta`` (capability ``lora_delta``)."""

    def read_lora(self, directory: Path) -> dict[str, tuple[Any, Any, float]]:
        """``{module: (A, B, scaling)}`` from a PEFT adapter directory, as float64 numpy arrays; loads nothing."""
        from tensafe.he.peft import read_peft_lora

        return read_peft_lora(Path(directory))[0]

    @contextlib.contextmanager
    def lora_delta(self, modules: Collection[str], delta: Callable[[str, Any], Any]) -> Iterator[None]:
        """Run the base model alone, with ``delta(module, x)`` added to each named linear module's output."""
        import numpy as np

        self._require()
        base = self._peft.get_base_model()
        handles = []

        def hook_for(name: str) -> Callable[..., torch.Tensor]:
            def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
                x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to("cpu", torch.float64).numpy()
                added = np.asarray(delta(name, x), dtype=np.float64)
                if added.shape != (x.shape[0], output.shape[-1]):
                    raise BackendError(
                        f"the LoRA delta for {name!r} has shape {added.shape}, not {(x.shape[0], output.shape[-1])}"
                    )
                return output + torch.from_numpy(added).to(output.device, output.dtype).reshape(output.shape)

            return hook

        try:
            for name in modules:
                try:
                    module = base.get_submodule(name)
                except AttributeError:
                    raise UsageError(f"the model has no module {name!r} for a LoRA delta") from None
                linear = getattr(module, "base_layer", module)  # a PEFT-wrapped layer's own linear map
                if not isinstance(linear, torch.nn.Linear):
                    raise UsageError(f"module {name!r} is not a linear layer")
                handles.append(linear.register_forward_hook(hook_for(name)))
            with self._peft.disable_adapter():
                yield
        finally:
            for handle in handles:
                handle.remove()
