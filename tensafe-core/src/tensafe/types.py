"""Data types exchanged with backends, mirroring the Tinker API where it fits.

Alignment rule (as in Tinker): position ``i`` of ``Datum.model_input`` predicts
``loss_fn_inputs["target_tokens"][i]``. Build a datum from a token sequence by
shifting (input = seq[:-1], targets = seq[1:]) and give prompt tokens weight 0;
:func:`datum_from_sequence` does exactly that.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

LossFnType = Literal["cross_entropy", "importance_sampling", "ppo"]
LOSS_FUNCTIONS: tuple[str, ...] = ("cross_entropy", "importance_sampling", "ppo")

#: ``loss_fn_inputs`` keys each loss needs, beyond ``target_tokens``.
LOSS_INPUTS: dict[str, frozenset[str]] = {
    "cross_entropy": frozenset({"target_tokens", "weights"}),
    "importance_sampling": frozenset({"target_tokens", "logprobs", "advantages"}),
    "ppo": frozenset({"target_tokens", "logprobs", "advantages"}),
}
_KNOWN_INPUTS = frozenset({"target_tokens", "weights", "logprobs", "advantages"})


#: Largest value of a signed 64-bit integer: the widest seed or id a backend or database column holds.
INT64_MAX = 2**63 - 1
#: Largest token id accepted: token ids index embedding tables, whose indices are 32-bit in practice.
MAX_TOKEN_ID = 2**31 - 1
#: Lowest non-zero temperature: far below it, logits / temperature leave float32's range and sampling turns
#: to NaN (1e-300 is 0 in float32); at it, a logit gap of 0.1 already weighs e**100, greedy in effect.
MIN_TEMPERATURE = 1e-3
#: Smallest nucleus mass: below it float32 cumulative probabilities cannot tell the nucleus apart.
MIN_TOP_P = 1e-6


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Settings(_Strict):
    """Settings a caller sends: NaN and infinity are refused, so every float is finite."""

    model_config = ConfigDict(allow_inf_nan=False)


def valid_unicode(text: str, what: str) -> str:
    """``text`` if it is valid Unicode: JSON may escape half a surrogate pair, which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} is not valid Unicode (a lone surrogate at position {exc.start})") from None
    return text


class Datum(_Strict):
    """One training example: input tokens plus per-token loss inputs."""

    model_input: list[int] = Field(description="Input token ids; position i predicts target_tokens[i].")
    loss_fn_inputs: dict[str, list[int] | list[float]] = Field(
        description="Per-token arrays: target_tokens (int), weights, logprobs, advantages (float)."
    )

    @model_validator(mode="after")
    def _check_shapes(self) -> Datum:
        if not self.model_input:
            raise ValueError("model_input is empty")
        unknown = set(self.loss_fn_inputs) - _KNOWN_INPUTS
        if unknown:
            raise ValueError(f"unknown loss_fn_inputs {sorted(unknown)}; known: {sorted(_KNOWN_INPUTS)}")
        if "target_tokens" not in self.loss_fn_inputs:
            raise ValueError("loss_fn_inputs needs 'target_tokens'")
        if any(not 0 <= t <= MAX_TOKEN_ID for t in self.model_input):
            raise ValueError(f"model_input holds a token id outside 0..{MAX_TOKEN_ID}")
        for key, values in self.loss_fn_inputs.items():
            if len(values) != len(self.model_input):
                raise ValueError(
                    f"loss_fn_inputs[{key!r}] has {len(values)} values for {len(self.model_input)} input tokens"
                )
            if key == "target_tokens":
                if any(not float(v).is_integer() for v in values):
                    raise ValueError("target_tokens must be integers")
                if any(not 0 <= v <= MAX_TOKEN_ID for v in values):
                    raise ValueError(f"target_tokens holds a token id outside 0..{MAX_TOKEN_ID}")
            elif any(not math.isfinite(v) for v in values):
                raise ValueError(f"loss_fn_inputs[{key!r}] contains NaN or infinity")
        return self

    @property
    def target_tokens(self) -> list[int]:
        return [int(t) for t in self.loss_fn_inputs["target_tokens"]]

    def values(self, key: str, default: float | None = None) -> list[float]:
        """The float array ``key``; ``default`` fills it when absent (else KeyError)."""
        if key in self.loss_fn_inputs:
            return [float(v) for v in self.loss_fn_inputs[key]]
        if default is None:
            raise KeyError(key)
        return [default] * len(self.model_input)


def datum_from_sequence(tokens: Sequence[int], prompt_length: int = 0) -> Datum:
    """Build a cross-entropy datum from a whole sequence.

    :param tokens: prompt followed by completion, at least two tokens.
    :param prompt_length: how many leading tokens are prompt; they get weight 0.
    """
    if len(tokens) < 2:
        raise ValueError("a training sequence needs at least two tokens")
    if not 0 <= prompt_length < len(tokens):
        raise ValueError(f"prompt_length {prompt_length} is outside 0..{len(tokens) - 1}")
    targets = list(tokens[1:])
    weights = [0.0 if i + 1 < prompt_length else 1.0 for i in range(len(targets))]
    return Datum(model_input=list(tokens[:-1]), loss_fn_inputs={"target_tokens": targets, "weights": weights})


class AdamParams(_Settings):
    """AdamW hyper-parameters; defaults are Tinker's. Every value is finite."""

    learning_rate: float = Field(
        1e-4, gt=0, le=1, description="Step size, at most 1: an Adam step moves each weight by about this much."
    )
    beta1: float = Field(0.9, ge=0, lt=1, description="First-moment decay.")
    beta2: float = Field(0.95, ge=0, lt=1, description="Second-moment decay.")
    eps: float = Field(1e-12, gt=0, le=1, description="Denominator term.")
    weight_decay: float = Field(
        0.0, ge=0, le=1, description="Decoupled weight decay, at most 1 (with the step size, a shrink, not a flip)."
    )
    grad_clip_norm: float = Field(
        0.0, ge=0, le=1e6, description="Global gradient-norm clip (0 = off); DP runs clip per sample instead."
    )


class SamplingParams(_Settings):
    """Generation settings; defaults are Tinker's. Every value is finite and within what backends compute."""

    max_tokens: int | None = Field(
        None, ge=1, le=MAX_TOKEN_ID, description="Most tokens to generate (None = backend limit)."
    )
    seed: int | None = Field(
        None, ge=0, le=INT64_MAX, description="Seed for reproducible sampling, 0 to 2**63 - 1 (a 64-bit seed)."
    )
    stop: str | list[str] | list[Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]] | None = Field(
        None, description="Stop strings or stop token ids."
    )
    temperature: float = Field(
        1.0,
        ge=0,
        le=100,
        description=f"0 means greedy; else {MIN_TEMPERATURE} to 100: below, logits / temperature overflow float32 "
        "(and the choice is greedy in effect); above, sampling is uniform in effect.",
    )
    top_k: int = Field(-1, le=MAX_TOKEN_ID, description="Keep the k most likely tokens (-1 = all).")
    top_p: float = Field(
        1.0,
        ge=MIN_TOP_P,
        le=1,
        description=f"Nucleus sampling mass, {MIN_TOP_P} to 1: smaller masses vanish in float32 probabilities.",
    )

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float) -> float:
        if 0 < value < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}")
        return value

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, value: int) -> int:
        if value == 0 or value < -1:
            raise ValueError("top_k must be -1 (off) or a positive integer")
        return value

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | list[int] | None) -> str | list[str] | list[int] | None:
        for item in [value] if isinstance(value, str) else value or []:
            if isinstance(item, str):
                valid_unicode(item, "a stop string")
        return value


class ForwardBackwardOutput(_Strict):
    """What ``forward`` / ``forward_backward`` return."""

    loss_fn_output_type: str = Field(description="The loss function that was applied.")
    loss_fn_outputs: list[dict[str, list[float]]] = Field(
        description="Per datum, in order: at least 'logprobs' (log p of each target token)."
    )
    metrics: dict[str, float] = Field(description="At least 'loss:sum' (summed over tokens and data).")


class OptimStepResponse(_Strict):
    """What ``optim_step`` returns."""

    step: int = Field(ge=1, description="Optimizer steps taken so far, this one included.")
    metrics: dict[str, float] = Field(default_factory=dict)


StopReason = Literal["length", "stop"]


class SampledSequence(_Strict):
    """One generated continuation."""

    tokens: list[int]
    logprobs: list[float] = Field(description="Log-probability of each generated token under the sampler.")
    stop_reason: StopReason
    text: str


class SampleResponse(_Strict):
    """All continuations of one prompt."""

    sequences: list[SampledSequence]


class ModelInfo(_Strict):
    """What ``initialize_model`` reports about the model it loaded."""

    model_name: str
    vocab_size: int = Field(ge=1)
    eos_token_id: int | None = None
    trainable_parameters: int = Field(ge=0)
    total_parameters: int = Field(ge=0)
    device: str | None = Field(None, description="Where the model runs (e.g. 'cpu', 'cuda:0'), if the backend says.")
    dtype: str | None = Field(None, description="The weights' dtype (e.g. 'float32'), if the backend says.")
