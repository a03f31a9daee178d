"""A PEFT LoRA adapter directory read as ``{module: (A, B, scaling)}``, for the key owner to encrypt."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tensafe.errors import MissingDependencyError, UsageError


def read_peft_lora(directory: Path) -> tuple[dict[str, tuple[Any, Any, float]], dict[str, Any]]:
    """``({module: (A, B, scaling)}, adapter_config)`` from a PEFT LoRA adapter directory, as float64 arrays.

    Reads safetensors and JSON only; loads no model.
    """
    try:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file
    except ImportError:
        raise MissingDependencyError("reading a PEFT adapter needs safetensors: pip install safetensors") from None

    directory = Path(directory)
    if not (directory / "adapter_config.json").is_file():
        raise UsageError(f"{directory} is not a PEFT adapter directory (no adapter_config.json)")
    try:
        config = json.loads((directory / "adapter_config.json").read_text(encoding="utf-8"))
        tensors = load_file(str(directory / "adapter_model.safetensors"))
        rank, alpha = int(config["r"]), float(config["lora_alpha"])
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        raise UsageError(f"{directory} is not a readable PEFT LoRA adapter: {exc}") from None
    if any(config.get(k) for k in ("use_rslora", "use_dora", "rank_pattern", "alpha_pattern")):
        raise UsageError("HE-LoRA supports plain LoRA adapters (no rsLoRA, DoRA or per-module ranks)")
    modules: dict[str, tuple[Any, Any, float]] = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key[: -len(".lora_A.weight")].removeprefix("base_model.model.")
        b = tensors.get(key.replace(".lora_A.", ".lora_B."))
        if b is None or a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
            raise UsageError(f"adapter module {name!r} has no matching lora_B or mismatched shapes")
        modules[name] = (a.astype("float64"), b.astype("float64"), alpha / rank)
    if not modules:
        raise UsageError(f"{directory} holds no LoRA weights")
    return modules, config
