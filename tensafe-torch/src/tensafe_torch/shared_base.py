"""One frozen copy of each base model per process, shared by every session that trains an adapter on it.

A hosted fine-tuning service keeps one copy of a base model's weights and gives
each session only its adapter, optimizer and DP state. Here the sessions of one
(model, dtype, device) hold a :class:`FrozenBase`: the weights (and the
tokenizer) loaded once, frozen (``requires_grad`` false) and never modified.
Each session wraps its own **view** of them (:meth:`FrozenBase.view`): a
module tree of its own whose parameters and buffers *are* the frozen base's
tensors. PEFT injects the session's LoRA layers into that tree; Opacus' hooks
and the fast clipping path (:mod:`tensafe_torch.lora_clipping`) attach to it.
A forward pass therefore runs through one session's modules only: no other
session's adapter, hooks, train/eval mode or per-sample gradients is reachable
from it, without any lock or per-thread "active adapter" switch, and sessions
on different threads run their passes concurrently over the same weights.
A view costs the module objects (Python attributes, no tensor data).

The cache holds each :class:`FrozenBase` weakly: backends keep theirs alive,
and the weights are freed when the last backend using them is.
``TENSAFE_TORCH_SHARE_BASE=0`` (or ``TorchBackend(share_base=False)``) gives
every backend a private copy, as before sharing existed (a baseline for
measuring memory).
"""

from __future__ import annotations

import copy
import os
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

from tensafe.errors import UsageError
from tensafe_torch import assets
from tensafe_torch.loading import building_model, load_base

if TYPE_CHECKING:
    from tensafe.config import RunConfig

#: Environment variable that turns base-model sharing off ("0", "false", "no", "off") or on (the default).
SHARE_ENV = "TENSAFE_TORCH_SHARE_BASE"
_OFF = {"0", "false", "no", "off"}
_ON = {"", "1", "true", "yes", "on"}

_CACHE: weakref.WeakValueDictionary[tuple[str, str, str], FrozenBase] = weakref.WeakValueDictionary()


def sharing_enabled(share_base: bool | None) -> bool:
    """``share_base`` when given, else what :data:`SHARE_ENV` says (sharing on by default)."""
    if share_base is not None:
        return share_base
    value = os.environ.get(SHARE_ENV, "").strip().lower()
    if value not in _OFF | _ON:
        raise UsageError(f"{SHARE_ENV}={value!r} is neither on (1, true, yes, on) nor off (0, false, no, off)")
    return value not in _OFF


class FrozenBase:
    """A base model's tokenizer and weights, frozen on their device; sessions wrap :meth:`view` s of it."""

    def __init__(self, tokenizer: Any, model: torch.nn.Module, device: torch.device) -> None:
        model.to(device)
        model.requires_grad_(False)
        model.eval()
        self.tokenizer = tokenizer
        self._model = model
        # Every tensor a module holds, as a parameter, a buffer or a plain attribute (e.g. a rotary
        # embedding's cached frequencies): a view shares them all.
        tensors: dict[int, torch.Tensor] = {}
        for module in model.modules():
            for value in (*module._parameters.values(), *module._buffers.values(), *vars(module).values()):
                if isinstance(value, torch.Tensor):
                    tensors[id(value)] = value
        self._tensors = tensors

    def view(self) -> Any:
        """A module tree of its own over the frozen weights: its modules are new, its tensors are the base's."""
        memo: dict[int, Any] = dict(self._tensors)
        return copy.deepcopy(self._model, memo)

    def parameters(self) -> Iterable[torch.nn.Parameter]:
        return self._model.parameters()


def acquire_base(config: RunConfig, device: torch.device, *, shared: bool) -> FrozenBase:
    """The frozen base ``config.model`` names on ``device``: the process's shared copy, or a private one."""
    source = config.model.path or str(assets.TINY_MODEL)
    local = os.path.expanduser(source)
    key = (os.path.realpath(local) if os.path.exists(local) else source, config.model.dtype, str(device))
    with building_model():
        base = _CACHE.get(key) if shared else None
        if base is None:
            base = FrozenBase(*load_base(config), device)
            if shared:
                _CACHE[key] = base
        return base


def move_adapter(model: torch.nn.Module, device: torch.device) -> None:
    """Move ``model``'s parameters that are elsewhere (a loaded adapter's) to ``device``.

    Unlike ``model.to``, it leaves the frozen base's parameters alone: they are on
    ``device`` already, and other sessions read them meanwhile.
    """
    with torch.no_grad():
        for param in model.parameters():
            if param.device != device:
                param.data = param.data.to(device)


def tensor_bytes(modules: Iterable[torch.nn.Module], extra: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct tensor storages that ``modules`` (parameters, buffers) and ``extra`` hold.

    A storage that several modules share is counted once.
    """
    storages: dict[tuple[str, int], int] = {}
    tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())]
    for tensor in (*tensors, *extra):
        storage = tensor.untyped_storage()
        storages[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())
