"""Data types exchanged with backends."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from tensafe.types import AdamParams, Datum, SamplingParams, datum_from_sequence


def test_datum_from_sequence_shifts_and_masks_the_prompt() -> None:
    datum = datum_from_sequence([10, 11, 12, 13, 14], prompt_length=3)
    assert datum.model_input == [10, 11, 12, 13]
    assert datum.target_tokens == [11, 12, 13, 14]
    # targets 11 and 12 are prompt tokens; 13 and 14 are the completion
    assert datum.values("weights") == [0.0, 0.0, 1.0, 1.0]


@pytest.mark.parametrize(
    ("model_input", "inputs", "message"),
    [
        ([], {"target_tokens": []}, "model_input is empty"),
        ([1, 2], {"target_tokens": [2]}, "has 1 values for 2 input tokens"),
        ([1], {"weights": [1.0]}, "needs 'target_tokens'"),
        ([1], {"target_tokens": [2], "rewards": [1.0]}, "unknown loss_fn_inputs"),
        ([1], {"target_tokens": [2.5]}, "must be integers"),
        ([1], {"target_tokens": [2], "advantages": [math.nan]}, "NaN"),
    ],
)
def test_malformed_datums_are_rejected(model_input: list[int], inputs: dict[str, list[float]], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Datum(model_input=model_input, loss_fn_inputs=inputs)


def test_datum_needs_two_tokens_and_a_valid_prompt_length() -> None:
    with pytest.raises(ValueError, match="at least two tokens"):
        datum_from_sequence([1])
    with pytest.raises(ValueError, match="prompt_length"):
        datum_from_sequence([1, 2], prompt_length=2)


def test_sampling_params_defaults_and_validation() -> None:
    params = SamplingParams()
    assert (params.temperature, params.top_k, params.top_p, params.max_tokens) == (1.0, -1, 1.0, None)
    for bad in ({"top_k": 0}, {"top_p": 0}, {"temperature": -1}, {"max_tokens": 0}):
        with pytest.raises(ValidationError):
            SamplingParams(**bad)


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": 1e-300},
        {"temperature": 1e-4},
        {"temperature": math.inf},
        {"temperature": 101},
        {"top_p": 1e-300},
        {"top_p": math.nan},
        {"seed": 2**64},
        {"seed": 2**63},
        {"seed": -1},
        {"stop": "\ud800"},
        {"stop": [2**64]},
    ],
)
def test_sampling_params_refuse_what_a_backend_cannot_compute(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError, match=next(iter(bad))):
        SamplingParams(**bad)


def test_sampling_params_keep_greedy_and_the_edges_of_the_ranges() -> None:
    params = SamplingParams(temperature=0, top_p=1e-6, seed=2**63 - 1)
    assert (params.temperature, params.top_p, params.seed) == (0, 1e-6, 2**63 - 1)
    assert SamplingParams(temperature=1e-3).temperature == 1e-3


@pytest.mark.parametrize(
    "bad",
    [
        {"learning_rate": math.inf},
        {"learning_rate": math.nan},
        {"learning_rate": 2.0},
        {"eps": math.inf},
        {"weight_decay": math.inf},
        {"grad_clip_norm": math.inf},
    ],
)
def test_adam_params_are_finite_and_in_range(bad: dict[str, float]) -> None:
    with pytest.raises(ValidationError, match=next(iter(bad))):
        AdamParams(**bad)


@pytest.mark.parametrize(
    ("model_input", "targets"),
    [([-1], [2]), ([2**31], [2]), ([1], [-1]), ([1], [2**64])],
)
def test_token_ids_outside_an_embedding_index_are_rejected(model_input: list[int], targets: list[int]) -> None:
    with pytest.raises(ValidationError, match="token id outside"):
        Datum(model_input=model_input, loss_fn_inputs={"target_tokens": targets})
