"""Data types exchanged with backends, mirroring the Tinker API where it fits.

Alignment rule (as in Tinker): position ``i`` of ``Datum.model_input`` predicts
``loss_fn_inputs["target_tokens"][i]``. Build a datum from a token sequence by
shifting (input = seq[:-1], targets = seq[1:]) and give prompt tokens weight 0;
:func:`datum_from_sequence` does exactly that.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

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


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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
        for key, values in self.loss_fn_inputs.items():
            if len(values) != len(self.model_input):
                raise ValueError(
                    f"loss_fn_inputs[{key!r}] has {len(values)} values for {len(self.model_input)} input tokens"
                )
            if key == "target_tokens":
                if any(not float(v).is_integer() for v in values):
                    raise ValueError("target_tokens must be integers")
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


class AdamParams(_Strict):
    """AdamW hyper-parameters; defaults are Tinker's."""

    learning_rate: float = Field(1e-4, gt=0, description="Step size.")
    beta1: float = Field(0.9, ge=0, lt=1, description="First-moment decay.")
    beta2: float = Field(0.95, ge=0, lt=1, description="Second-moment decay.")
    eps: float = Field(1e-12, gt=0, description="Denominator term.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay.")
    grad_clip_norm: float = Field(
        0.0, ge=0, description="Global gradient-norm clip (0 = off); DP runs clip per sample instead."
    )


class SamplingParams(_Strict):
    """Generation settings; defaults are Tinker's."""

    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate (None = backend limit).")
    seed: int | None = Field(None, description="Seed for reproducible sampling.")
    stop: str | list[str] | list[int] | None = Field(None, description="Stop strings or stop token ids.")
    temperature: float = Field(1.0, ge=0, description="0 means greedy.")
    top_k: int = Field(-1, description="Keep the k most likely tokens (-1 = all).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, value: int) -> int:
        if value == 0 or value < -1:
            raise ValueError("top_k must be -1 (off) or a positive integer")
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
