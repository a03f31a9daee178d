"""A byte-level bigram language model, written in pure Python, as a TenSafe ML backend.

Tokens are the 256 byte values of UTF-8 text plus an end-of-sequence token
(id 256). The model predicts the next token from the current one through a
257 x 257 table of logits. The frozen "base model" is a table of zeros (the
uniform distribution); the trainable "adapter" is a second table added to it,
so the logits are simply the adapter table. Row ``r`` holds the logits of the
token that follows token ``r``.

Training follows Tinker's semantics: the cross-entropy loss is summed over
tokens and data (``loss:sum``), ``forward_backward`` accumulates gradients and
``optim_step`` applies them with AdamW. Under ``config.dp.enabled`` the update
is DP-SGD: every datum's gradient is clipped to ``dp.max_grad_norm``, the
clipped gradients are summed, Gaussian noise of standard deviation
``noise_multiplier * max_grad_norm`` is added to every parameter and the result
is divided by the expected batch size ``training.batch_size``.

The noise comes from the operating system's CSPRNG (``random.SystemRandom``)
under ``dp.secure_rng``; otherwise, for reproducible research runs, from a
generator seeded by ``(training.seed, step)``. Either way no generator state is
saved: a saved state cannot regenerate any noise, and a run resumed under
``secure_rng`` draws fresh noise. ``noised_gradient`` returns the gradient the
last DP step applied (capability ``dp_probe``) for the conformance suite, and
``forward_backward_canaries`` accumulates Dirac gradient canaries (capability
``gradient_canaries``) for white-box privacy audits.
"""

from __future__ import annotations

import json
import math
import random
from array import array
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar

from tensafe import capabilities
from tensafe.config import DPConfig, RunConfig
from tensafe.errors import BackendError
from tensafe.interfaces import MLBackend
from tensafe.types import (
    LOSS_INPUTS,
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    LossFnType,
    ModelInfo,
    OptimStepResponse,
    SampleResponse,
    SamplingParams,
)
from tensafe_bigram.sampling import generate, stop_sets
from tensafe_bigram.tables import (
    ADAPTER_FILE,
    ADAPTER_FORMAT,
    ADAPTER_VERSION,
    BYTE_TOKENS,
    DEFAULT_MAX_TOKENS,
    EOS_TOKEN_ID,
    MODEL_NAME,
    PPO_CLIP,
    STATE_FORMAT,
    STATE_VERSION,
    TABLE_SIZE,
    VOCAB_SIZE,
    SparseGrad,
    _clip,
    _counter,
    _float_table,
    _is_number,
    _log_softmax_row,
    _rng_state_from_json,
    _rng_state_to_json,
)


class BigramBackend(MLBackend):
    """A trainable byte-level bigram language model (pure Python, standard library only)."""

    capabilities: ClassVar[frozenset[str]] = frozenset(
        {
            capabilities.DP_SGD,
            capabilities.DP_PROBE,
            capabilities.GRADIENT_CANARIES,
            capabilities.SEEDED_SAMPLING,
            capabilities.POLICY_LOSSES,
        }
    )

    def __init__(self) -> None:
        self._config: RunConfig | None = None
        self._table = array("d", bytes(8 * TABLE_SIZE))
        self._adam_m = array("d", bytes(8 * TABLE_SIZE))
        self._adam_v = array("d", bytes(8 * TABLE_SIZE))
        self._step = 0
        self._adam_steps = 0
        self._pending: list[SparseGrad] = []
        self._noised: array[float] | None = None
        self._noise_rng = random.Random()
        self._sample_rng = random.Random()

    # ------------------------------------------------------------------
    # Model and tokenizer
    # ------------------------------------------------------------------

    def initialize_model(self, config: RunConfig) -> ModelInfo:
        if config.model.path is not None:
            raise BackendError(
                f"the bigram backend has no model files; model.path must be unset (got {config.model.path!r})"
            )
        # config.lora.seed is accepted but unused: the adapter starts at zero (the uniform distribution).
        self._config = config
        self._table = array("d", bytes(8 * TABLE_SIZE))
        self._adam_m = array("d", bytes(8 * TABLE_SIZE))
        self._adam_v = array("d", bytes(8 * TABLE_SIZE))
        self._step = 0
        self._adam_steps = 0
        self._pending = []
        self._noised = None
        seed = config.training.seed
        self._noise_rng = random.Random()  # used only without secure_rng and without a seed
        self._sample_rng = random.Random(f"{seed}:sampling") if seed is not None else random.Random()
        return ModelInfo(
            model_name=MODEL_NAME,
            vocab_size=VOCAB_SIZE,
            eos_token_id=EOS_TOKEN_ID,
            trainable_parameters=TABLE_SIZE,
            total_parameters=2 * TABLE_SIZE,
        )

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, tokens: Sequence[int]) -> str:
        return bytes(t for t in tokens if 0 <= t < BYTE_TOKENS).decode("utf-8", errors="replace")

    # ------------------------------------------------------------------
    # Loss and gradients
    # ------------------------------------------------------------------

    def _require_config(self, operation: str) -> RunConfig:
        if self._config is None:
            raise BackendError(f"bigram backend: {operation} was called before initialize_model")
        return self._config

    def _check_batch(self, data: Sequence[Datum], loss_fn: str, operation: str) -> None:
        self._require_config(operation)
        if loss_fn not in LOSS_INPUTS:
            raise BackendError(f"unknown loss_fn {loss_fn!r}; known: {', '.join(sorted(LOSS_INPUTS))}")
        if not data:
            raise BackendError(f"bigram backend: {operation} needs at least one datum, got an empty list")
        for index, datum in enumerate(data):
            if not isinstance(datum, Datum):
                raise BackendError(f"datum {index} is a {type(datum).__name__}, not a tensafe.types.Datum")
            missing = LOSS_INPUTS[loss_fn] - set(datum.loss_fn_inputs) - {"weights"}
            if missing:
                raise BackendError(f"datum {index}: loss {loss_fn!r} needs loss_fn_inputs {sorted(missing)}")
            for field, tokens in (("model_input", datum.model_input), ("target_tokens", datum.target_tokens)):
                for position, token in enumerate(tokens):
                    if not 0 <= token < VOCAB_SIZE:
                        raise BackendError(
                            f"datum {index}: {field}[{position}] = {token} is outside the vocabulary [0, {VOCAB_SIZE})"
                        )

    def _run(
        self,
        data: Sequence[Datum],
        with_grads: bool,
        loss_fn: str = "cross_entropy",
        clip: tuple[float, float] = PPO_CLIP,
    ) -> tuple[ForwardBackwardOutput, list[SparseGrad]]:
        table = self._table
        rows: dict[int, tuple[list[float], float]] = {}  # row -> (softmax, log-sum-exp), computed once per call
        outputs: list[dict[str, list[float]]] = []
        grads: list[SparseGrad] = []
        loss_terms: list[float] = []
        weight_terms: list[float] = []
        clipped = 0
        for datum in data:
            targets = datum.target_tokens
            weights = datum.values("weights", 1.0)
            sampler = datum.values("logprobs", 0.0)
            advantages = datum.values("advantages", 0.0)
            logprobs: list[float] = []
            # Per row: total weight of the positions reading it, and weight per target token.
            row_weight: dict[int, float] = {}
            row_targets: dict[int, dict[int, float]] = {}
            for position, (token, target, weight) in enumerate(zip(datum.model_input, targets, weights, strict=True)):
                cached = rows.get(token)
                if cached is None:
                    start = token * VOCAB_SIZE
                    cached = _log_softmax_row(table[start : start + VOCAB_SIZE])
                    rows[token] = cached
                logp = table[token * VOCAB_SIZE + target] - cached[1]
                logprobs.append(logp)
                weight_terms.append(weight)
                if loss_fn == "cross_entropy":
                    loss_terms.append(-weight * logp)
                else:
                    # -A r with r = exp(logp - sampler): d/dlogp = -A r, i.e. cross-entropy with weight A r.
                    ratio, advantage = math.exp(logp - sampler[position]), advantages[position]
                    if loss_fn == "importance_sampling":
                        loss_terms.append(-weight * ratio * advantage)
                    else:
                        bounded = max(clip[0], min(clip[1], ratio))
                        loss_terms.append(-weight * min(ratio * advantage, bounded * advantage))
                    active = loss_fn == "importance_sampling" or (
                        (advantage >= 0 and ratio <= clip[1]) or (advantage < 0 and ratio >= clip[0])
                    )
                    clipped += weight != 0 and not active
                    weight = weight * advantage * ratio if active else 0.0
                if with_grads and weight != 0.0:
                    row_weight[token] = row_weight.get(token, 0.0) + weight
                    per_target = row_targets.setdefault(token, {})
                    per_target[target] = per_target.get(target, 0.0) + weight
            outputs.append({"logprobs": logprobs})
            if with_grads:
                grad: SparseGrad = {}
                for token, total in row_weight.items():
                    # d(-sum w log p_t) / d logit_j = sum w * (p_j - [j == t])
                    row_grad = [total * p for p in rows[token][0]]
                    for target, weight in row_targets[token].items():
                        row_grad[target] -= weight
                    grad[token] = row_grad
                grads.append(grad)
        metrics = {"loss:sum": math.fsum(loss_terms), "tokens": math.fsum(weight_terms)}
        if loss_fn == "ppo":
            metrics["clip_fraction"] = clipped / max(1, sum(1 for w in weight_terms if w))
        output = ForwardBackwardOutput(loss_fn_output_type=loss_fn, loss_fn_outputs=outputs, metrics=metrics)
        return output, grads

    def forward(
        self, data: Sequence[Datum], loss_fn: LossFnType, loss_fn_config: Mapping[str, float] | None = None
    ) -> ForwardBackwardOutput:
        self._check_batch(data, loss_fn, "forward")
        output, _ = self._run(data, False, loss_fn, _clip(loss_fn_config))
        return output

    def forward_backward(
        self, data: Sequence[Datum], loss_fn: LossFnType, loss_fn_config: Mapping[str, float] | None = None
    ) -> ForwardBackwardOutput:
        self._check_batch(data, loss_fn, "forward_backward")
        output, grads = self._run(data, True, loss_fn, _clip(loss_fn_config))
        self._pending.extend(grads)
        return output

    def forward_backward_canaries(self, coordinates: Sequence[int], norm: float) -> None:
        """Accumulate one datum per coordinate (row-major over the table) whose gradient is ``norm`` there."""
        self._require_config("forward_backward_canaries")
        if not (math.isfinite(norm) and norm > 0.0):
            raise BackendError(f"bigram backend: a canary's norm must be a positive finite number, got {norm}")
        for coordinate in coordinates:
            if not 0 <= coordinate < TABLE_SIZE:
                raise BackendError(f"bigram backend: canary coordinate {coordinate} is outside [0, {TABLE_SIZE})")
        for coordinate in coordinates:
            row, column = divmod(coordinate, VOCAB_SIZE)
            gradient = [0.0] * VOCAB_SIZE
            gradient[column] = norm
            self._pending.append({row: gradient})

    # ------------------------------------------------------------------
    # Optimizer
    # ------------------------------------------------------------------

    def _dp_gradient(self, config: RunConfig) -> array[float]:
        """Sum of per-datum gradients clipped to C, plus N(0, (sigma C)^2) noise, over the expected batch size."""
        total = self._clipped_sum(config.dp.max_grad_norm)
        gauss = self._noise_source(config).gauss
        std = self._noise_std(config.dp)
        inv_batch = 1.0 / config.training.batch_size
        return array("d", [(g + gauss(0.0, std)) * inv_batch for g in total])

    def _clipped_sum(self, clip: float) -> array[float]:
        """The sum of the accumulated per-datum gradients, each first scaled down to norm at most ``clip``."""
        total = array("d", bytes(8 * TABLE_SIZE))
        for grad in self._pending:
            norm = math.sqrt(math.fsum(g * g for row in grad.values() for g in row))
            scale = min(1.0, clip / norm) if norm > 0.0 else 1.0
            for token, row in grad.items():
                start = token * VOCAB_SIZE
                for j, g in enumerate(row):
                    total[start + j] += scale * g
        return total

    def _noise_std(self, dp: DPConfig) -> float:
        """Standard deviation of the noise added to the clipped sum: ``noise_multiplier * max_grad_norm``."""
        if dp.noise_multiplier is None:
            raise BackendError("bigram backend: dp.noise_multiplier must be resolved before training")
        return dp.noise_multiplier * dp.max_grad_norm

    def _noise_source(self, config: RunConfig) -> random.Random:
        """The generator of this step's noise; its state is never saved.

        Under ``secure_rng`` the OS CSPRNG. Otherwise a generator seeded from
        ``(training.seed, step)``, so that a resumed run draws the noise an
        uninterrupted one would have (reproducible, not private).
        """
        if config.dp.secure_rng:
            return random.SystemRandom()
        seed = config.training.seed
        if seed is None:
            return self._noise_rng
        return random.Random(f"{seed}:noise:{self._step}")

    def _summed_gradient(self) -> array[float]:
        total = array("d", bytes(8 * TABLE_SIZE))
        for grad in self._pending:
            for token, row in grad.items():
                start = token * VOCAB_SIZE
                for j, g in enumerate(row):
                    total[start + j] += g
        return total

    def optim_step(self, adam_params: AdamParams) -> OptimStepResponse:
        config = self._require_config("optim_step")
        metrics: dict[str, float] = {}
        if config.dp.enabled:
            # Under DP an empty (Poisson-sampled) batch still takes a step: the noise alone.
            gradient: array[float] | None = self._dp_gradient(config)
            self._noised = gradient
        elif self._pending:
            gradient = self._summed_gradient()
        else:
            gradient = None  # nothing accumulated: no update, as an optimizer skips parameters without gradients
        if gradient is not None:
            norm = math.sqrt(math.fsum(g * g for g in gradient))
            metrics["grad_norm"] = norm
            if not config.dp.enabled and adam_params.grad_clip_norm > 0.0 and norm > adam_params.grad_clip_norm:
                factor = adam_params.grad_clip_norm / norm
                gradient = array("d", [g * factor for g in gradient])
            self._adamw(gradient, adam_params)
        else:
            metrics["grad_norm"] = 0.0
        self._pending = []
        self._step += 1
        return OptimStepResponse(step=self._step, metrics=metrics)

    def noised_gradient(self) -> list[float]:
        """The gradient the last DP ``optim_step`` applied, row-major over the table (capability ``dp_probe``)."""
        if self._noised is None:
            raise BackendError("bigram backend: noised_gradient needs a DP optim_step first")
        return self._noised.tolist()

    def _adamw(self, gradient: array[float], params: AdamParams) -> None:
        """One AdamW update (decoupled weight decay, bias-corrected moments), as torch.optim.AdamW."""
        self._adam_steps += 1
        t = self._adam_steps
        lr, beta1, beta2, eps = params.learning_rate, params.beta1, params.beta2, params.eps
        decay = 1.0 - lr * params.weight_decay
        correction1 = 1.0 - beta1**t
        step_size = lr / correction1
        sqrt_correction2 = math.sqrt(1.0 - beta2**t)
        one_minus_beta1 = 1.0 - beta1
        one_minus_beta2 = 1.0 - beta2
        sqrt = math.sqrt
        table, m, v = self._table, self._adam_m, self._adam_v
        for i, g in enumerate(gradient):
            mi = beta1 * m[i] + one_minus_beta1 * g
            vi = beta2 * v[i] + one_minus_beta2 * g * g
            m[i] = mi
            v[i] = vi
            table[i] = table[i] * decay - step_size * mi / (sqrt(vi) / sqrt_correction2 + eps)

    # ------------------------------------------------------------------
    # Sampling
    # ------------------------------------------------------------------

    def sample(
        self, prompts: Sequence[Sequence[int]], sampling_params: SamplingParams, num_samples: int = 1
    ) -> list[SampleResponse]:
        self._require_config("sample")
        if num_samples < 1:
            raise BackendError(f"bigram backend: num_samples must be at least 1, got {num_samples}")
        for index, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise BackendError(f"bigram backend: prompt {index} is empty; a bigram model needs a last token")
            for position, token in enumerate(prompt):
                if not 0 <= token < VOCAB_SIZE:
                    raise BackendError(
                        f"prompt {index}: token {position} = {token} is outside the vocabulary [0, {VOCAB_SIZE})"
                    )
        rng = random.Random(sampling_params.seed) if sampling_params.seed is not None else self._sample_rng
        max_tokens = sampling_params.max_tokens if sampling_params.max_tokens is not None else DEFAULT_MAX_TOKENS
        stop_strings, stop_tokens = stop_sets(sampling_params.stop)
        responses: list[SampleResponse] = []
        for prompt in prompts:
            sequences = [
                generate(
                    self._table,
                    self.decode,
                    int(prompt[-1]),
                    sampling_params,
                    max_tokens,
                    stop_strings,
                    stop_tokens,
                    rng,
                )
                for _ in range(num_samples)
            ]
            responses.append(SampleResponse(sequences=sequences))
        return responses

    # ------------------------------------------------------------------
    # State and export
    # ------------------------------------------------------------------

    def save_state(self) -> bytes:
        self._require_config("save_state")
        state = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "vocab_size": VOCAB_SIZE,
            "step": self._step,
            "adam_steps": self._adam_steps,
            "table": self._table.tolist(),
            "adam_m": self._adam_m.tolist(),
            "adam_v": self._adam_v.tolist(),
            "sample_rng": _rng_state_to_json(self._sample_rng),
        }
        return json.dumps(state, separators=(",", ":")).encode("utf-8")

    def load_state(self, state: bytes) -> int:
        self._require_config("load_state")
        if not isinstance(state, bytes | bytearray | memoryview):
            raise BackendError(f"bigram state must be bytes, not {type(state).__name__}")
        try:
            data = json.loads(bytes(state).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BackendError(f"bigram state is not valid UTF-8 JSON: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
            raise BackendError(f"not a bigram backend state (expected format {STATE_FORMAT!r})")
        if data.get("version") != STATE_VERSION:
            raise BackendError(f"unsupported bigram state version {data.get('version')!r}; expected {STATE_VERSION}")
        if data.get("vocab_size") != VOCAB_SIZE:
            raise BackendError(f"bigram state has vocab_size {data.get('vocab_size')!r}; expected {VOCAB_SIZE}")
        step = _counter(data.get("step"), "step")
        adam_steps = _counter(data.get("adam_steps"), "adam_steps")
        table = _float_table(data.get("table"), "table")
        adam_m = _float_table(data.get("adam_m"), "adam_m")
        adam_v = _float_table(data.get("adam_v"), "adam_v")
        # States written before the noise generator was left out of them carry "noise_rng": never restored.
        sample_state = _rng_state_from_json(data.get("sample_rng"), "sample_rng")
        self._table, self._adam_m, self._adam_v = table, adam_m, adam_v
        self._step, self._adam_steps = step, adam_steps
        self._sample_rng.setstate(sample_state)
        self._pending = []
        self._noised = None
        return step

    def export_adapter(self, directory: Path) -> list[Path]:
        self._require_config("export_adapter")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / ADAPTER_FILE
        rows = [self._table[r * VOCAB_SIZE : (r + 1) * VOCAB_SIZE].tolist() for r in range(VOCAB_SIZE)]
        adapter = {
            "format": ADAPTER_FORMAT,
            "version": ADAPTER_VERSION,
            "model_name": MODEL_NAME,
            "vocab_size": VOCAB_SIZE,
            "eos_token_id": EOS_TOKEN_ID,
            "tokenizer": "utf-8 bytes; token 256 is end-of-sequence",
            "description": "logits[r][j]: logit of token j following token r, added to a frozen base of zeros",
            "logits": rows,
        }
        path.write_text(json.dumps(adapter, separators=(",", ":")), encoding="utf-8")
        return [path]

    def load_adapter(self, directory: Path) -> None:
        """Replace the logits table with one :meth:`export_adapter` wrote; optimizer state is kept."""
        self._require_config("load_adapter")
        path = Path(directory) / ADAPTER_FILE
        if not path.is_file():
            raise BackendError(f"no bigram adapter in {directory}: {ADAPTER_FILE} not found")
        try:
            adapter = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BackendError(f"{path} is not valid UTF-8 JSON: {exc}") from None
        if not isinstance(adapter, dict) or adapter.get("format") != ADAPTER_FORMAT:
            raise BackendError(f"{path} is not a bigram adapter (expected format {ADAPTER_FORMAT!r})")
        if adapter.get("version") != ADAPTER_VERSION:
            raise BackendError(f"{path}: unsupported adapter version {adapter.get('version')!r}")
        if adapter.get("vocab_size") != VOCAB_SIZE:
            raise BackendError(f"{path}: vocab_size {adapter.get('vocab_size')!r} is not {VOCAB_SIZE}")
        rows = adapter.get("logits")
        if not (
            isinstance(rows, list)
            and len(rows) == VOCAB_SIZE
            and all(isinstance(row, list) and len(row) == VOCAB_SIZE for row in rows)
        ):
            raise BackendError(f"{path}: logits must be {VOCAB_SIZE} rows of {VOCAB_SIZE} numbers")
        flat = [x for row in rows for x in row]
        if not all(_is_number(x) for x in flat):
            raise BackendError(f"{path}: logits contain something that is not a number")
        self._table = array("d", flat)
        self._pending = []
