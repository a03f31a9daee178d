"""Loading the base model for the torch backend: device, dtype, the model and tokenizer, LoRA targets.

Also the quiet imports: PEFT's deprecation noise and Opacus' root log handler
are kept away from the user.

Models are built one at a time in a process (see :func:`building_model`):
the server creates sessions on many threads at once, and building a model is
not thread-safe.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tensafe.errors import BackendError, UsageError
from tensafe_torch import assets

if TYPE_CHECKING:
    from tensafe.config import LoraConfig, RunConfig

ATTENTION_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "c_attn", "query", "key", "value", "out_proj")
MLP_NAMES = ("gate_proj", "up_proj", "down_proj", "fc1", "fc2", "c_fc", "dense_h_to_4h", "dense_4h_to_h")
UNEMBED_NAMES = ("lm_head",)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: Held while a model is built. transformers' ``from_pretrained`` swaps process-wide state for the
#: duration of a load (torch's default dtype, ``PreTrainedModel.tie_weights``, ``torch.nn.init``'s
#: functions, ``torch.linspace``) and puts back what it found on exit: two loads on two threads
#: interleave, the later one puts back the earlier one's stand-ins, and from then on every load in the
#: process leaves its tied weights on the meta device ("Cannot copy out of meta tensor"). Its lazy
#: imports also fail (ImportError) when two threads trigger them at once. Reentrant, so a caller may
#: hold it around a whole build (loading, then wrapping with PEFT under a seeded global RNG).
_BUILDING = threading.RLock()


@contextlib.contextmanager
def building_model() -> Iterator[None]:
    """Hold the process's model-building lock: no other thread loads or builds a model meanwhile."""
    with _BUILDING:
        yield


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """peft calls a transformers property that transformers 5 deprecated; that is not the user's concern."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def import_opacus_quietly() -> None:
    """Import Opacus without the root log handler its ``logging.basicConfig`` adds.

    That handler would print every library's log lines (Hugging Face's included)
    a second time.
    """
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    import opacus  # noqa: F401

    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def require_hub(model_id: str) -> None:
    """Fail at once, not after minutes of retries, when a hub model can neither be found locally nor fetched."""
    import os
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(model_id, "config.json"), str):
        return  # in the local Hugging Face cache: loads offline
    advice = "pass a local model directory (--model DIR or model.path)"
    switched_off = {os.environ.get(name, "").strip().lower() for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    if constants.HF_HUB_OFFLINE or switched_off & {"1", "true", "yes", "on"}:
        raise UsageError(
            f"model {model_id!r} is not a local directory nor in the Hugging Face cache, and the hub is "
            f"switched off (HF_HUB_OFFLINE); {advice}"
        )
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as exc:
        raise UsageError(
            f"model {model_id!r} is not a local directory nor in the Hugging Face cache, and the hub ({host}) "
            f"cannot be reached ({exc}); {advice}"
        ) from None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"model.device is {name!r} but no CUDA device is available")
    return device


def load_base(config: RunConfig) -> tuple[Any, Any]:
    """The tokenizer and base model ``config.model`` names: a local directory, the embedded model, or a hub id."""
    source = config.model.path or str(assets.TINY_MODEL)
    local = Path(source).expanduser()
    is_local = local.exists() or source.startswith((".", "/", "~"))
    if is_local and not (local / "config.json").is_file():
        raise UsageError(f"model path {source!r} is not a model directory (no config.json)")
    if not is_local:
        require_hub(source)
    with building_model():
        from safetensors import SafetensorError
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # TenSafe draws its own progress; weight loading is instant here
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(local) if is_local else source, local_files_only=is_local)
            model = AutoModelForCausalLM.from_pretrained(
                str(local) if is_local else source, local_files_only=is_local, dtype=DTYPES[config.model.dtype]
            )
        except (OSError, ValueError, SafetensorError) as exc:
            hint = "" if is_local else " (hub models need network access; pass a local directory instead)"
            raise BackendError(f"could not load model {source!r}: {exc}{hint}") from None
    return tokenizer, model


def target_modules(model: Any, lora: LoraConfig) -> list[str]:
    """The modules LoRA adapts: ``lora.target_modules`` (checked against the model) or those the switches choose."""
    linear = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    if lora.target_modules:
        # Matched as PEFT matches (a module's name or its dotted suffix), but here, so that a name the model
        # lacks is the caller's mistake with the choices listed, not a ValueError from deep inside PEFT.
        names = [name for name, _ in model.named_modules()]
        unknown = [t for t in lora.target_modules if not any(n == t or n.endswith(f".{t}") for n in names)]
        if unknown:
            raise UsageError(
                f"lora.target_modules {unknown} name no module of this model; its linear modules: {sorted(linear)}"
            )
        return list(lora.target_modules)
    wanted: tuple[str, ...] = ()
    wanted += ATTENTION_NAMES if lora.train_attn else ()
    wanted += MLP_NAMES if lora.train_mlp else ()
    wanted += UNEMBED_NAMES if lora.train_unembed else ()
    targets = sorted(linear & set(wanted))
    if not targets:
        raise UsageError(
            f"no LoRA target modules found for this model; set lora.target_modules to some of: {sorted(linear)}"
        )
    return targets
