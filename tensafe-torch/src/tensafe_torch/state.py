"""The torch backend's training state: adapter weights, AdamW moments, sampling RNG and step, as safetensors.

Never the DP noise generator's state (see :mod:`tensafe_torch.noise`): a state
that carries one is refused.
"""

from __future__ import annotations

import json
import struct

import torch

from tensafe.errors import BackendError

STATE_MAGIC = b"TENSAFE-TORCH-STATE\x01"


class StateMixin:
    """``save_state`` and ``load_state``."""

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for name, param in zip(self._names, self._params, strict=True):
            tensors[f"param.{name}"] = param.detach().cpu().contiguous()
            state = self._optimizer.state.get(param, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    tensors[f"adam.{key}.{name}"] = state[key].detach().cpu().contiguous()
        tensors["rng.sampling"] = self._sampling_generator.get_state()  # generation, not DP noise
        return tensors

    def save_state(self) -> bytes:
        from safetensors.torch import save

        cfg = self._cfg
        adam_steps = {
            name: float(self._optimizer.state[p]["step"])
            for name, p in zip(self._names, self._params, strict=True)
            if "step" in self._optimizer.state.get(p, {})
        }
        header = json.dumps(
            {
                "step": self._step,
                "adam_steps": adam_steps,
                "lora": cfg.lora.model_dump(),
                "model": cfg.model.path,
                "dp": cfg.dp.enabled,
            }
        ).encode()
        payload = save(self._state_tensors())
        return STATE_MAGIC + struct.pack("<Q", len(header)) + header + payload

    def load_state(self, state: bytes) -> int:
        """Restore a :meth:`save_state`.

        The state holds no DP noise generator: the next step's noise is keyed afresh
        from the CSPRNG, or, in a research run (``dp.secure_rng: false``), from
        (``training.seed``, restored step), which reproduces the uninterrupted run.
        """
        from safetensors.torch import load

        cfg = self._cfg
        try:
            if not state.startswith(STATE_MAGIC):
                raise ValueError("not a tensafe-torch state")
            offset = len(STATE_MAGIC)
            (length,) = struct.unpack_from("<Q", state, offset)
            header = json.loads(state[offset + 8 : offset + 8 + length])
            tensors = load(state[offset + 8 + length :])
        except (ValueError, struct.error, UnicodeDecodeError) as exc:
            raise BackendError(f"cannot read training state: {exc}") from None
        if header.get("lora") != cfg.lora.model_dump() or header.get("model") != cfg.model.path:
            raise BackendError("the training state was saved with another model or LoRA configuration")
        if bool(header.get("dp")) != cfg.dp.enabled:
            raise BackendError("the training state and the config disagree on dp.enabled")
        if "rng.noise" in tensors:
            raise BackendError(
                "the training state carries the DP noise generator's state (written by an earlier tensafe-torch); "
                "states that carry noise-generator state are no longer accepted, since whoever holds one can "
                "regenerate the run's noise and remove it"
            )
        allowed = {"rng.sampling"} | {
            f"{kind}.{name}" for name in self._names for kind in ("param", "adam.exp_avg", "adam.exp_avg_sq")
        }
        if set(tensors) - allowed or any(f"param.{n}" not in tensors for n in self._names):
            raise BackendError("the training state does not match this model's adapter parameters")
        with torch.no_grad():
            for name, param in zip(self._names, self._params, strict=True):
                saved = tensors[f"param.{name}"]
                if saved.shape != param.shape:
                    raise BackendError(f"state tensor {name} has shape {tuple(saved.shape)}, not {tuple(param.shape)}")
                param.copy_(saved.to(param.device, param.dtype))
                if f"adam.exp_avg.{name}" in tensors:
                    self._optimizer.state[param] = {
                        "step": torch.tensor(header["adam_steps"][name]),
                        "exp_avg": tensors[f"adam.exp_avg.{name}"].to(param.device),
                        "exp_avg_sq": tensors[f"adam.exp_avg_sq.{name}"].to(param.device),
                    }
                else:
                    self._optimizer.state.pop(param, None)
        self._sampling_generator.set_state(tensors["rng.sampling"])
        self._noised_gradient = None
        self._clear_gradients()
        self._step = int(header["step"])
        return self._step
