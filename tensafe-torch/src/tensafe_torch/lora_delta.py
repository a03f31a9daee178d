"""HE-LoRA in the torch backend: an adapter's LoRA factors, and the base model run with deltas from a callback."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import torch

from tensafe.errors import BackendError, UsageError


class LoraDeltaMixin:
    """``read_lora`` and ``lora_delta`` (capability ``lora_delta``)."""

    def read_lora(self, directory: Path) -> dict[str, tuple[Any, Any, float]]:
        """``{module: (A, B, scaling)}`` from a PEFT adapter directory, as float64 numpy arrays; loads nothing."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        directory = Path(directory)
        try:
            config = json.loads((directory / "adapter_config.json").read_text(encoding="utf-8"))
            tensors = load_file(str(directory / "adapter_model.safetensors"))
            rank, alpha = int(config["r"]), float(config["lora_alpha"])
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
            raise UsageError(f"{directory} is not a readable PEFT LoRA adapter: {exc}") from None
        if (
            config.get("use_rslora")
            or config.get("use_dora")
            or config.get("rank_pattern")
            or config.get("alpha_pattern")
        ):
            raise BackendError("HE-LoRA supports plain LoRA adapters (no rsLoRA, DoRA or per-module ranks)")
        modules: dict[str, tuple[Any, Any, float]] = {}
        for key, a in tensors.items():
            if not key.endswith(".lora_A.weight"):
                continue
            name = key[: -len(".lora_A.weight")].removeprefix("base_model.model.")
            b = tensors.get(key.replace(".lora_A.", ".lora_B."))
            if b is None or a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
                raise BackendError(f"adapter module {name!r} has no matching lora_B or mismatched shapes")
            modules[name] = (a.astype("float64"), b.astype("float64"), alpha / rank)
        if not modules:
            raise BackendError(f"{directory} holds no LoRA weights")
        return modules

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
