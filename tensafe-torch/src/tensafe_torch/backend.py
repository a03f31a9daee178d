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
"""

from __future__ import annotations

import bisect
import contextlib
import inspect
import itertools
import json
import math
import secrets
import struct
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from tensafe import capabilities
from tensafe.config import RunConfig
from tensafe.errors import BackendError, UsageError
from tensafe.interfaces import MLBackend
from tensafe.types import (
    LOSS_INPUTS,
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    LossFnType,
    ModelInfo,
    OptimStepResponse,
    SampledSequence,
    SampleResponse,
    SamplingParams,
    StopReason,
)
from tensafe_torch import assets
from tensafe_torch.loading import building_model, import_opacus_quietly, quiet_peft, resolve_device, target_modules
from tensafe_torch.shared_base import acquire_base, move_adapter, sharing_enabled

if TYPE_CHECKING:
    from tensafe_torch.lora_clipping import LoraPerSampleGradients
    from tensafe_torch.noise import StepKeyedDPOptimizer

STATE_MAGIC = b"TENSAFE-TORCH-STATE\x01"
# Public prompts in the default dataset's format, with invented names and record numbers found in no record.
DEFAULT_PROBES = assets.HERE / "default_probes.json"
DEFAULT_MAX_TOKENS = 64
#: Most per-sample gradient elements that gradient canaries hold at once (chunks of canaries x parameters).
CANARY_CHUNK_ELEMENTS = 1 << 22
PPO_CLIP = (0.8, 1.2)


def _seeded_generator(seed: int | None, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else secrets.randbits(63))
    return generator


class TorchBackend(MLBackend):
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
        }
    )

    def __init__(self, *, share_base: bool | None = None) -> None:
        """``share_base``: wrap the process's one frozen copy of the base model (the default, see
        :mod:`tensafe_torch.shared_base`) or a private copy; ``None`` follows ``$TENSAFE_TORCH_SHARE_BASE``."""
        self._config: RunConfig | None = None
        self._step = 0
        self._share_base = share_base

    # -- setup ---------------------------------------------------------------------

    def default_dataset(self) -> Path:
        return assets.DEFAULT_DATASET

    def default_probes(self) -> list[str]:
        return [str(prompt) for prompt in json.loads(DEFAULT_PROBES.read_text(encoding="utf-8"))]

    def initialize_model(self, config: RunConfig) -> ModelInfo:
        from peft import LoraConfig, get_peft_model

        self._config = config
        self._device = resolve_device(config.model.device)
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
        self._sampling_generator = _seeded_generator(config.training.seed, self._device)
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

    # -- losses --------------------------------------------------------------------

    def _check(self, data: Sequence[Datum], loss_fn: str) -> None:
        self._require()
        if loss_fn not in LOSS_INPUTS:
            raise BackendError(f"unknown loss_fn {loss_fn!r}; known: {', '.join(sorted(LOSS_INPUTS))}")
        if not data:
            raise BackendError("empty batch: forward needs at least one datum")
        for index, datum in enumerate(data):
            missing = LOSS_INPUTS[loss_fn] - set(datum.loss_fn_inputs) - {"weights"}
            if missing:
                raise BackendError(f"datum {index}: loss {loss_fn!r} needs loss_fn_inputs {sorted(missing)}")
            tokens = [*datum.model_input, *datum.target_tokens]
            bad = [t for t in tokens if not 0 <= t < self._vocab_size]
            if bad:
                raise BackendError(
                    f"datum {index}: token id {bad[0]} is outside the vocabulary (0..{self._vocab_size - 1})"
                )
            if len(datum.model_input) > self._max_positions:
                raise BackendError(
                    f"datum {index}: {len(datum.model_input)} tokens exceed the model's {self._max_positions} positions"
                )

    def _tensors(self, data: Sequence[Datum]) -> dict[str, torch.Tensor]:
        width = max(len(d.model_input) for d in data)
        rows = len(data)

        def pad(values: list[list[float]], dtype: torch.dtype) -> torch.Tensor:
            out = torch.zeros((rows, width), dtype=dtype)
            for i, row in enumerate(values):
                out[i, : len(row)] = torch.tensor(row, dtype=dtype)
            return out.to(self._device)

        mask = [[1.0] * len(d.model_input) for d in data]
        return {
            "input_ids": pad([d.model_input for d in data], torch.long),  # type: ignore[misc]
            "attention_mask": pad(mask, torch.long),
            "mask": pad(mask, torch.float32),
            "targets": pad([d.target_tokens for d in data], torch.long),  # type: ignore[misc]
            "weights": pad([d.values("weights", 1.0) for d in data], torch.float32),
            "sampler_logprobs": pad([d.values("logprobs", 0.0) for d in data], torch.float32),
            "advantages": pad([d.values("advantages", 0.0) for d in data], torch.float32),
        }

    def _loss(
        self, data: Sequence[Datum], loss_fn: str, loss_fn_config: Mapping[str, float] | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, float]]:
        """Per-datum losses, target logprobs (rows, width) and the token mask."""
        t = self._tensors(data)
        logits = self._forward_module(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, t["targets"].unsqueeze(-1)).squeeze(-1)
        mask = t["mask"]
        metrics: dict[str, float] = {}
        if loss_fn == "cross_entropy":
            per_datum = -(t["weights"] * logprobs * mask).sum(dim=1)
        else:
            config = dict(loss_fn_config or {})
            # Weights scale each position's policy loss (0 on prompt tokens), once; the ratio metrics
            # describe the positions with weight.
            weights = mask * t["weights"]
            mask = (weights != 0).float()
            ratio = torch.exp(logprobs - t["sampler_logprobs"])
            advantages = t["advantages"]
            if loss_fn == "importance_sampling":
                per_datum = -(ratio * advantages * weights).sum(dim=1)
            else:
                low = float(config.get("clip_low_threshold", PPO_CLIP[0]))
                high = float(config.get("clip_high_threshold", PPO_CLIP[1]))
                if not 0 < low <= 1 <= high:
                    raise BackendError(f"ppo clip thresholds must satisfy 0 < low <= 1 <= high, got {low}, {high}")
                clipped = torch.clamp(ratio, low, high)
                objective = torch.minimum(ratio * advantages, clipped * advantages)
                per_datum = -(objective * weights).sum(dim=1)
                outside = ((ratio < low) | (ratio > high)).float() * mask
                metrics["clip_fraction"] = float(outside.sum() / mask.sum().clamp(min=1))
            with torch.no_grad():
                tokens = mask.sum().clamp(min=1)
                log_ratio = (logprobs - t["sampler_logprobs"]) * mask
                metrics["ratio_mean"] = float((ratio * mask).sum() / tokens)
                metrics["kl_sampler"] = float(((torch.exp(log_ratio) - 1 - log_ratio) * mask).sum() / tokens)
        metrics["loss:sum"] = float(per_datum.detach().sum())
        return per_datum, logprobs, mask, metrics

    def _output(
        self, loss_fn: str, logprobs: torch.Tensor, data: Sequence[Datum], metrics: dict[str, float]
    ) -> ForwardBackwardOutput:
        rows = logprobs.detach().cpu()
        outputs = [{"logprobs": rows[i, : len(d.model_input)].tolist()} for i, d in enumerate(data)]
        return ForwardBackwardOutput(loss_fn_output_type=loss_fn, loss_fn_outputs=outputs, metrics=metrics)

    def forward(
        self, data: Sequence[Datum], loss_fn: LossFnType, loss_fn_config: Mapping[str, float] | None = None
    ) -> ForwardBackwardOutput:
        self._check(data, loss_fn)
        self._peft.eval()
        try:
            with torch.no_grad():
                if self._hooks is not None:
                    # GradSampleModule's hooks are only needed for training.
                    self._hooks.disable_hooks()
                try:
                    _, logprobs, _, metrics = self._loss(data, loss_fn, loss_fn_config)
                finally:
                    if self._hooks is not None:
                        self._hooks.enable_hooks()
        finally:
            self._peft.train()
        return self._output(loss_fn, logprobs, data, metrics)

    def forward_backward(
        self, data: Sequence[Datum], loss_fn: LossFnType, loss_fn_config: Mapping[str, float] | None = None
    ) -> ForwardBackwardOutput:
        self._check(data, loss_fn)
        if self._pending_reset:
            self._clear_gradients()
        if self._lora_per_sample is not None:
            self._lora_per_sample.begin(len(data))
        per_datum, logprobs, _, metrics = self._loss(data, loss_fn, loss_fn_config)
        if self._hooks is not None:
            # Opacus' per-sample hooks sit on LoRA layers whose inputs come from frozen layers; torch
            # warns that such a hook sees no input gradients, which per-sample gradients do not need.
            # Added to the process's filters (once; filterwarnings drops a duplicate), not in a
            # catch_warnings block: that swaps the process-wide list and puts back what it found, so
            # sessions backpropagating on other threads would lose or leak each other's filters.
            warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        per_datum.sum().backward()
        if self._dp is not None:
            # Clip each datum's gradient and add it to the running sum, then drop the
            # per-sample gradients so the next micro-batch starts clean.
            if self._lora_per_sample is not None:
                self._dp.accumulate_clipped(self._lora_per_sample.clipped_sums(self._cfg.dp.max_grad_norm))
            else:
                self._dp.clip_and_accumulate()
            for param in self._params:
                param.grad_sample = None
                param.grad = None
        return self._output(loss_fn, logprobs, data, metrics)

    def forward_backward_canaries(self, coordinates: Sequence[int], norm: float) -> None:
        """Accumulate Dirac canaries as per-sample gradients, clipped by Opacus like any datum's."""
        self._require()
        if self._dp is None:
            raise BackendError("gradient canaries need DP-SGD: this backend was initialised with dp.enabled false")
        if not (math.isfinite(norm) and norm > 0):
            raise BackendError(f"a canary's norm must be a positive finite number, got {norm}")
        sizes = [p.numel() for p in self._params]
        offsets = [0, *itertools.accumulate(sizes)]
        bad = [c for c in coordinates if not 0 <= c < offsets[-1]]
        if bad:
            raise BackendError(f"canary coordinate {bad[0]} is outside the {offsets[-1]} trainable parameters")
        if self._pending_reset:
            self._clear_gradients()
        # Per-sample gradients of a chunk of canaries at a time, to bound their memory.
        chunk = max(1, CANARY_CHUNK_ELEMENTS // offsets[-1])
        for start in range(0, len(coordinates), chunk):
            batch = coordinates[start : start + chunk]
            samples = [
                torch.zeros((len(batch), size), dtype=p.dtype, device=p.device)
                for p, size in zip(self._params, sizes, strict=True)
            ]
            for row, coordinate in enumerate(batch):
                index = bisect.bisect_right(offsets, coordinate) - 1
                samples[index][row, coordinate - offsets[index]] = norm
            for param, sample in zip(self._params, samples, strict=True):
                param.grad_sample = sample.view(len(batch), *param.shape)
            self._dp.clip_and_accumulate()
            for param in self._params:
                param.grad_sample = None

    # -- optimizer -------------------------------------------------------------------

    _pending_reset = False

    def _clear_gradients(self) -> None:
        for param in self._params:
            param.grad = None
            if self._dp is not None:
                param.grad_sample = None
                param.summed_grad = None
        self._pending_reset = False

    def optim_step(self, adam_params: AdamParams) -> OptimStepResponse:
        cfg = self._cfg
        if self._pending_reset:
            self._clear_gradients()
        for group in self._optimizer.param_groups:
            group.update(
                lr=adam_params.learning_rate,
                betas=(adam_params.beta1, adam_params.beta2),
                eps=adam_params.eps,
                weight_decay=adam_params.weight_decay,
            )
        if self._dp is not None:
            for param in self._params:
                if getattr(param, "summed_grad", None) is None:
                    param.summed_grad = torch.zeros_like(param)  # an empty Poisson batch: noise only
            self._dp.add_step_noise(self._step)
            for param in self._params:
                param.grad /= cfg.training.batch_size
                param.summed_grad = None  # the noised sum is in grad now; a session keeps one copy
            self._noised_gradient = torch.cat([p.grad.detach().reshape(-1) for p in self._params]).float().cpu()
        else:
            for param in self._params:
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
            if adam_params.grad_clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(self._params, adam_params.grad_clip_norm)
        grad_norm = float(torch.sqrt(sum((p.grad.float() ** 2).sum() for p in self._params)))
        self._optimizer.step()
        self._step += 1
        # Gradients stay readable until the next forward_backward (tests and diagnostics use them).
        self._pending_reset = True
        return OptimStepResponse(step=self._step, metrics={"grad_norm": grad_norm})

    def noised_gradient(self) -> list[float]:
        self._require()
        if self._dp is None:
            raise BackendError("noised_gradient needs DP-SGD: this backend was initialised with dp.enabled false")
        if self._noised_gradient is None:
            raise BackendError("no DP optim_step has run yet (since initialisation or the last load_state)")
        return list(self._noised_gradient.tolist())

    # -- sampling ----------------------------------------------------------------------

    def _generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, count: int, generator: torch.Generator
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (tokens, logprobs), each of shape (prompts * count,), one position at a time.

        The prompts must have one length, so they run as one batch without padding.
        """
        ids = torch.tensor([list(p) for p in prompts for _ in range(count)], dtype=torch.long, device=self._device)
        prompt = prompts[0]
        model = self._peft
        # transformers 5 renamed the KV cache argument and output from past_key_values to cache.
        cache_name = (
            "cache" if "cache" in inspect.signature(model.get_base_model().forward).parameters else ("past_key_values")
        )
        cache = None
        step_input = ids
        for _ in range(self._max_new_tokens(prompt, params)):
            out = model(input_ids=step_input, use_cache=True, **{cache_name: cache})
            cache = out[cache_name]
            logits = out.logits[:, -1, :].float()
            if params.temperature == 0:
                token = logits.argmax(dim=-1)
                logprob = torch.log_softmax(logits, dim=-1).gather(-1, token[:, None]).squeeze(-1)
            else:
                logits = logits / params.temperature
                if params.top_k > 0 and params.top_k < logits.shape[-1]:
                    kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, -math.inf)
                probs = torch.softmax(logits, dim=-1)
                if params.top_p < 1.0:
                    sorted_probs, order = torch.sort(probs, descending=True, dim=-1)
                    before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
                    sorted_probs = sorted_probs.masked_fill(before >= params.top_p, 0.0)
                    probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
                    probs = probs / probs.sum(dim=-1, keepdim=True)
                token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
                logprob = torch.log(probs.gather(-1, token[:, None]).squeeze(-1))
            yield token, logprob
            step_input = token[:, None]

    def _max_new_tokens(self, prompt: Sequence[int], params: SamplingParams) -> int:
        room = self._max_positions - len(prompt)
        if room < 1:
            raise BackendError(f"prompt of {len(prompt)} tokens leaves no room in {self._max_positions} positions")
        return min(params.max_tokens or DEFAULT_MAX_TOKENS, room)

    def _stops(self, params: SamplingParams) -> tuple[set[int], list[str]]:
        ids = {int(self._tokenizer.eos_token_id)} if self._tokenizer.eos_token_id is not None else set()
        texts: list[str] = []
        stop = params.stop
        if isinstance(stop, str):
            texts.append(stop)
        elif stop:
            for item in stop:
                (texts.append(item) if isinstance(item, str) else ids.add(int(item)))  # type: ignore[func-returns-value]
        return ids, [t for t in texts if t]

    def _generator_for(self, params: SamplingParams) -> torch.Generator:
        """A fresh generator for a seeded request; otherwise the backend's own (saved with its state)."""
        return _seeded_generator(params.seed, self._device) if params.seed is not None else self._sampling_generator

    def _check_prompt(self, prompt: Sequence[int]) -> None:
        if not prompt:
            raise BackendError("empty prompt: sampling needs at least one prompt token")
        bad = [t for t in prompt if not 0 <= t < self._vocab_size]
        if bad:
            raise BackendError(f"prompt token id {bad[0]} is outside the vocabulary (0..{self._vocab_size - 1})")

    def sample(
        self, prompts: Sequence[Sequence[int]], sampling_params: SamplingParams, num_samples: int = 1
    ) -> list[SampleResponse]:
        self._require()
        if num_samples < 1:
            raise BackendError("num_samples must be at least 1")
        for prompt in prompts:
            self._check_prompt(prompt)
        stop_ids, stop_texts = self._stops(sampling_params)
        generator = self._generator_for(sampling_params)
        responses: list[SampleResponse] = []
        self._peft.eval()
        try:
            with torch.no_grad():
                # Prompts of one length are generated together: one forward pass per position for all of them.
                by_length: dict[int, list[int]] = {}
                for index, prompt in enumerate(prompts):
                    by_length.setdefault(len(prompt), []).append(index)
                results: dict[int, SampleResponse] = {}
                for indices in by_length.values():
                    rows = len(indices) * num_samples
                    tokens: list[list[int]] = [[] for _ in range(rows)]
                    logprobs: list[list[float]] = [[] for _ in range(rows)]
                    reasons: list[StopReason | None] = [None] * rows
                    group = [prompts[i] for i in indices]
                    for token, logprob in self._generate(group, sampling_params, num_samples, generator):
                        for i in range(rows):
                            if reasons[i] is not None:
                                continue
                            tokens[i].append(int(token[i]))
                            logprobs[i].append(float(logprob[i]))
                            if tokens[i][-1] in stop_ids or (
                                stop_texts and any(s in self.decode(tokens[i]) for s in stop_texts)
                            ):
                                reasons[i] = "stop"
                        if all(r is not None for r in reasons):
                            break
                    for n, index in enumerate(indices):
                        results[index] = SampleResponse(
                            sequences=[
                                SampledSequence(
                                    tokens=tokens[i],
                                    logprobs=logprobs[i],
                                    stop_reason=reasons[i] or "length",
                                    text=self.decode(tokens[i]),
                                )
                                for i in range(n * num_samples, (n + 1) * num_samples)
                            ]
                        )
                responses = [results[i] for i in range(len(prompts))]
        finally:
            self._peft.train()
        return responses

    def sample_stream(self, prompt: Sequence[int], sampling_params: SamplingParams) -> Iterator[str]:
        """Yield the text of one continuation piece by piece, as it is generated."""
        self._require()
        self._check_prompt(prompt)
        stop_ids, stop_texts = self._stops(sampling_params)
        generator = self._generator_for(sampling_params)
        tokens: list[int] = []
        shown = ""
        self._peft.eval()
        try:
            with torch.no_grad():
                for token, _ in self._generate([prompt], sampling_params, 1, generator):
                    tokens.append(int(token[0]))
                    text = self.decode(tokens)
                    if text.startswith(shown) and len(text) > len(shown):
                        yield text[len(shown) :]
                        shown = text
                    if tokens[-1] in stop_ids or (stop_texts and any(s in text for s in stop_texts)):
                        break
        finally:
            self._peft.train()

    # -- state -----------------------------------------------------------------------

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

    # -- LoRA deltas from a callback (HE-LoRA) ------------------------------------------

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
