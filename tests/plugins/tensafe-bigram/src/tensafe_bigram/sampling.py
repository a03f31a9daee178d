"""The bigram model's sampling: greedy or temperature / top-k / top-p, with stop strings and tokens."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

from tensafe.types import SampledSequence, SamplingParams, StopReason
from tensafe_bigram.tables import EOS_TOKEN_ID, VOCAB_SIZE, _log_softmax_row


def stop_sets(stop: str | Sequence[str | int] | None) -> tuple[list[str], set[int]]:
    """Stop strings and stop token ids, from ``SamplingParams.stop``."""
    stop_strings: list[str] = []
    stop_tokens: set[int] = set()
    if isinstance(stop, str):
        stop_strings = [stop] if stop else []
    elif stop:
        for item in stop:
            if isinstance(item, str):
                if item:
                    stop_strings.append(item)
            else:
                stop_tokens.add(int(item))
    return stop_strings, stop_tokens


def distribution(table: Sequence[float], token: int, params: SamplingParams) -> list[tuple[int, float]]:
    """``(token, probability)`` pairs of the sampling distribution after ``token``, most likely first."""
    start = token * VOCAB_SIZE
    logits = table[start : start + VOCAB_SIZE]
    temperature = params.temperature
    probs, _ = _log_softmax_row([x / temperature for x in logits])
    ranked = sorted(enumerate(probs), key=lambda pair: -pair[1])  # stable: ties keep the lower id first
    if params.top_k != -1:
        ranked = ranked[: params.top_k]
    if params.top_p < 1.0:
        kept: list[tuple[int, float]] = []
        mass = 0.0
        for pair in ranked:
            kept.append(pair)
            mass += pair[1]
            if mass >= params.top_p:
                break
        ranked = kept
    total = math.fsum(p for _, p in ranked)
    return [(tok, p / total) for tok, p in ranked]


def generate(
    table: Sequence[float],
    decode: Callable[[Sequence[int]], str],
    last: int,
    params: SamplingParams,
    max_tokens: int,
    stop_strings: list[str],
    stop_tokens: set[int],
    rng: random.Random,
) -> SampledSequence:
    tokens: list[int] = []
    logprobs: list[float] = []
    stop_reason: StopReason = "length"
    for _ in range(max_tokens):
        if params.temperature == 0.0:
            start = last * VOCAB_SIZE
            row = table[start : start + VOCAB_SIZE]
            best = max(range(VOCAB_SIZE), key=row.__getitem__)  # first maximum: the lowest id wins ties
            _, lse = _log_softmax_row(row)
            token, logp = best, row[best] - lse
        else:
            ranked = distribution(table, last, params)
            threshold = rng.random()
            cumulative = 0.0
            token, prob = ranked[-1]
            for candidate, p in ranked:
                cumulative += p
                if threshold < cumulative:
                    token, prob = candidate, p
                    break
            logp = math.log(prob)
        tokens.append(token)
        logprobs.append(logp)
        last = token
        if token == EOS_TOKEN_ID or token in stop_tokens:
            stop_reason = "stop"
            break
        if stop_strings:
            text = decode(tokens)
            if any(s in text for s in stop_strings):
                stop_reason = "stop"
                break
    return SampledSequence(tokens=tokens, logprobs=logprobs, stop_reason=stop_reason, text=decode(tokens))
