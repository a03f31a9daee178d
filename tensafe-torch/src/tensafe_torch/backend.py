"""The ``torch`` ML backend: Hugging Face causal LMs, PEFT LoRA, Opacus DP-SGD.

Training follows Tinker's semantics: losses are summed over tokens and data,
``forward_backward`` accumulates and ``optim_step`` applies AdamW. Only the
LoRA parameters are trainable; the base model's weights never change.

Under ``config.dp.enabled`` each datum's gradient is found by one of two means
(``dp.clipping``): Opacus' ``GradSampleModule`` (per-sample gradients by hooks),
or, when only plain LoRA weights train, the adapters' own backward pass
(:mod:`tensafe_torch.lora_clipping`, the default). Updates go through Opacus'
``DPOptimizer``: after every micro-batch each datum's gradient is clipped to ``max_grad_norm``
and added to a running sum (``clip_and_accumulate``, or ``accumulate_clipped`` for
sums the LoRA path clipped by the same rule); ``optim_step`` adds
Gaussian noise of standard deviation ``noise_multiplier * max_grad_norm`` once
(``add_step_noise``), divides by the *expected* batch size (Poisson sampling makes
the real one random) and steps AdamW. Physical micro-batches therefore never
change the result, only the memory used. An empty batch still gets its noise.
The noise of each step comes from a source keyed for that step alone and is
never part of a saved state (see :mod:`tensafe_torch.noise`). Gradient canaries
for white-box privacy audits (``forward_backward_canaries``) go through the
same ``clip_and_accumulate`` as every datum.

With ``join_workers`` (capability ``distributed``) the backend is one of a
run's worker processes: the workers' clipped sums are summed, the noise is
added once, by worker 0, and every worker applies the same update (see
:mod:`tensafe_torch.distributed`). Half-precision models (``model.dtype``)
compute under autocast; the LoRA weights, their gradients and the noise stay float32.

This module holds setup (model, adapter, DP machinery) and the adapter's
files; the rest lives beside it, one concern a module: :mod:`~tensafe_torch.losses`,
:mod:`~tensafe_torch.training`, :mod:`~tensafe_torch.generation`,
:mod:`~tensafe_torch.state` and :mod:`~tensafe_torch.lora_delta`.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from tensafe import capabilities
from tensafe.config import RunConfig
from tensafe.errors import BackendError, UsageError
from tensafe.interfaces import MLBackend, WorkerGroup
from tensafe.types import ModelInfo
from tensafe_torch import assets
from tensafe_torch.generation import DEFAULT_MAX_TOKENS, GenerationMixin, seeded_generator
from tensafe_torch.loading import (
    DTYPES,
    building_model,
    import_opacus_quietly,
    quiet_peft,
    resolve_device,
    target_modules,
)
from tensafe_torch.lora_delta import LoraDeltaMixin
from tensafe_torch.losses import PPO_CLIP, LossMixin
from tensafe_torch.shared_base import acquire_base, move_adapter, sharing_enabled
from tensafe_torch.state import STATE_MAGIC, StateMixin
from tensafe_torch.training import CANARY_CHUNK_ELEMENTS, TrainingMixin

if TYPE_CHECKING:
    from tensafe_torch.distributed import TorchWorkerGroup
    from tensafe_torch.lora_clipping import LoraPerSampleGradients
    from tensafe_torch.noise import StepKeyedDPOptimizer

__all__ = ["CANARY_CHUNK_ELEMENTS", "DEFAULT_MAX_TOKENS", "PPO_CLIP", "STATE_MAGIC", "TorchBackend"]

# Public prompts in the default dataset's format, with invented names and record numbers found in no record.
DEFAULT_PROBES = assets.HERE / "default_probes.json"


class TorchBackend(LossMixin, TrainingMixin, GenerationMixin, StateMixin, LoraDeltaMixin, MLBackend):
    """LoRA fine-tuning and sampling of a Hugging Face causal LM with optional DP-SGD."""

    capabilities: ClassVar[frozenset[str]] = frozenset(
        {
            capabilities.DP_SGD,
            capabilities.DP_PROBE,
            capabilities.GRADIENT_CANARIES,
            capabilities.SEEDED_SAMPLING,
            capabilities.POLICY_LOSSES,
            capabilities.STREAMING,
            capabilities.LORA_DELTA,
            capabilities.CHAT_TEMPLATE,
            capabilities.DISTRIBUTED,
        }
    )

    def __init__(self, *, share_base: bool | None = None) -> None:
        """``share_base``: wrap the process's one frozen copy of the base model (the default, see
        :mod:`tensafe_torch.shared_base`) or a private copy; ``None`` follows ``$TENSAFE_TORCH_SHARE_BASE``."""
        self._config: RunConfig | None = None
        self._step = 0
        self._share_base = share_base
        #: The run's other workers, once :meth:`join_workers` joined them.
        self._workers: TorchWorkerGroup | None = None

    # -- setup ---------------------------------------------------------------------

    def default_dataset(self) -> Path:
        return assets.DEFAULT_DATASET

    def default_probes(self) -> list[str]:
        return [str(prompt) for prompt in json.loads(DEFAULT_PROBES.read_text(encoding="utf-8"))]

    def join_workers(self, config: RunConfig) -> WorkerGroup:
        """Join the run's workers over gloo (CPU) or NCCL (CUDA, one GPU per worker: ``LOCAL_RANK``)."""
        from tensafe_torch.distributed import TorchWorkerGroup, worker_device

        if self._workers is not None:
            raise BackendError("this backend already joined its run's workers")
        self._workers = TorchWorkerGroup(
            worker_device(resolve_device(config.model.device)), config.training.worker_timeout_s
        )
        return self._workers

    def initialize_model(self, config: RunConfig) -> ModelInfo:
        from peft import LoraConfig, get_peft_model

        from tensafe_torch.distributed import worker_device

        self._config = config
        self._device = resolve_device(config.model.device)
        if self._workers is not None:
            self._device = worker_device(self._device)
        #: Half-precision weights compute under autocast; the LoRA weights, gradients and noise stay float32.
        self._autocast = DTYPES[config.model.dtype] if config.model.dtype != "float32" else None
        # Held for as long as this backend wraps it: the shared copy lives while some backend does.
        self._frozen_base = acquire_base(config, self._device, shared=sharing_enabled(self._share_base))
        tokenizer, base = self._frozen_base.tokenizer, self._frozen_base.view()
        lora = config.lora
        peft_config = LoraConfig(
            r=lora.rank,
            lora_alpha=lora.scaling_alpha,
            lora_dropout=lora.dropout,
            target_modules=target_modules(base, config.lora),
            bias="none",
            task_type="CAUSAL_LM",
        )
        seed = lora.seed if lora.seed is not None else (config.training.seed or 0)
        # The seeded RNG is process-wide: no other build may draw from it meanwhile.
        with building_model(), torch.random.fork_rng(devices=[]), quiet_peft():
            torch.manual_seed(seed)
            model = get_peft_model(base, peft_config)
        self._tokenizer = tokenizer
        self._attach(model)
        self._sampling_generator = seeded_generator(config.training.seed, self._device)
        total = sum(p.numel() for p in model.parameters())
        return ModelInfo(
            model_name=config.model.path or "tensafe tiny-llama (embedded)",
            vocab_size=self._vocab_size,
            eos_token_id=tokenizer.eos_token_id,
            trainable_parameters=sum(p.numel() for p in self._params),
            total_parameters=total,
            device=str(self._device),
            dtype=config.model.dtype,
        )

    def _attach(self, model: Any) -> None:
        """Wire a (new) PEFT model: optimizer, and the DP machinery when enabled."""
        cfg = self._cfg
        self._peft = model
        self._step = 0
        self._vocab_size = int(model.get_input_embeddings().num_embeddings)
        self._max_positions = int(getattr(model.config, "max_position_embeddings", 1 << 30))
        self._params = [p for p in model.parameters() if p.requires_grad]
        with torch.no_grad():
            for param in self._params:  # float32 master weights, whatever the base model's dtype
                if param.dtype != torch.float32:
                    param.data = param.data.float()
        self._names = [n for n, p in model.named_parameters() if p.requires_grad]
        adam = cfg.optimizer
        self._optimizer = torch.optim.AdamW(
            self._params,
            lr=adam.learning_rate,
            betas=(adam.beta1, adam.beta2),
            eps=adam.eps,
            weight_decay=adam.weight_decay,
        )
        self._dp: StepKeyedDPOptimizer | None = None
        self._noised_gradient: torch.Tensor | None = None
        self._forward_module: Any = model
        self._hooks: Any = None  # Opacus' GradSampleModule under dp.clipping 'hooks'
        self._lora_per_sample: LoraPerSampleGradients | None = None
        #: How per-sample gradients are found under DP ('hooks' or 'lora'); None without DP.
        self.dp_clipping: str | None = None
        if cfg.dp.enabled:
            import_opacus_quietly()
            from opacus import GradSampleModule

            from tensafe_torch.lora_clipping import LoraPerSampleGradients, unsupported_parameters
            from tensafe_torch.noise import StepKeyedDPOptimizer

            if cfg.dp.noise_multiplier is None:
                raise BackendError("dp.noise_multiplier must be resolved (calibrated) before the model is initialised")
            self.dp_clipping = cfg.dp.clipping
            if self.dp_clipping == "auto":
                lora_only = not unsupported_parameters(model, self._names, self._params)
                self.dp_clipping = "lora" if lora_only else "hooks"
            if self.dp_clipping == "lora":
                self._lora_per_sample = LoraPerSampleGradients(model, self._names, self._params)
            else:
                self._hooks = self._forward_module = GradSampleModule(model, batch_first=True, loss_reduction="sum")
            research_seed = None
            if not cfg.dp.secure_rng:  # reproducible, not private
                seed = cfg.training.seed
                research_seed = seed if seed is not None else secrets.randbits(64)
            self._dp = StepKeyedDPOptimizer(
                self._optimizer,
                noise_multiplier=cfg.dp.noise_multiplier,
                max_grad_norm=cfg.dp.max_grad_norm,
                expected_batch_size=cfg.training.batch_size,
                loss_reduction="sum",
                secure_mode=cfg.dp.secure_mode,
                research_seed=research_seed,
            )
        model.train()

    def _require(self) -> RunConfig:
        if self._config is None:
            raise BackendError("the torch backend is not initialised; call initialize_model first")
        return self._config

    @property
    def _cfg(self) -> RunConfig:
        return self._require()

    # -- tokens --------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        self._require()
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> tuple[list[int], list[bool]]:
        from tensafe_torch.chat import encode_chat

        self._require()
        return encode_chat(self._tokenizer, messages)

    def decode(self, tokens: Sequence[int]) -> str:
        self._require()
        return str(self._tokenizer.decode(list(tokens), skip_special_tokens=True))

    # -- adapters ----------------------------------------------------------------------

    def export_adapter(self, directory: Path) -> list[Path]:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._peft.save_pretrained(str(directory), safe_serialization=True)
        files = [directory / "adapter_config.json", directory / "adapter_model.safetensors"]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise BackendError(f"PEFT did not write {missing}")
        return files

    def load_adapter(self, directory: Path) -> None:
        from peft import PeftModel

        directory = Path(directory)
        if not (directory / "adapter_config.json").is_file():
            raise UsageError(f"{directory} is not a PEFT adapter directory (no adapter_config.json)")
        base = self._peft.unload()
        try:
            with building_model(), quiet_peft():  # quiet_peft swaps the process's warning filters
                model = PeftModel.from_pretrained(base, str(directory), is_trainable=True)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise BackendError(f"cannot load adapter {directory} onto this model: {exc}") from None
        move_adapter(model, self._device)
        self._attach(model)
