"""The bigram model's sizes and formats, and the checks its saved states and adapters pass on load."""

from __future__ import annotations

import math
import random
from array import array
from collections.abc import Mapping, Sequence
from typing import Any

from tensafe.errors import BackendError

#: Number of byte tokens; the end-of-sequence token comes right after them.
BYTE_TOKENS = 256
#: The end-of-sequence token id.
EOS_TOKEN_ID = 256
#: Vocabulary size: 256 bytes plus EOS.
VOCAB_SIZE = 257
#: Number of parameters in one table (adapter or base).
TABLE_SIZE = VOCAB_SIZE * VOCAB_SIZE
#: Name reported in :class:`ModelInfo` and written into exported adapters.
MODEL_NAME = "bigram-bytes"
#: ``max_tokens`` used when the sampling parameters leave it unset.
DEFAULT_MAX_TOKENS = 64

STATE_FORMAT = "tensafe-bigram-state"
STATE_VERSION = 1
ADAPTER_FORMAT = "tensafe-bigram-adapter"
ADAPTER_VERSION = 1
ADAPTER_FILE = "bigram_adapter.json"

#: A datum's gradient: table row -> the 257 partial derivatives of that row's logits.
SparseGrad = dict[int, list[float]]


def _rng_state_to_json(rng: random.Random) -> list[Any]:
    version, internal, gauss_next = rng.getstate()
    return [version, list(internal), gauss_next]


def _rng_state_from_json(value: Any, what: str) -> tuple[Any, ...]:
    if not (isinstance(value, list) and len(value) == 3 and isinstance(value[1], list)):
        raise BackendError(f"bigram state: {what} must be [version, [internal state], gauss_next]")
    version, internal, gauss_next = value
    if not isinstance(version, int) or not all(isinstance(x, int) and not isinstance(x, bool) for x in internal):
        raise BackendError(f"bigram state: {what} has a malformed version or internal state")
    if gauss_next is not None and not _is_number(gauss_next):
        raise BackendError(f"bigram state: {what} has a malformed gauss_next")
    state = (version, tuple(internal), gauss_next)
    try:
        random.Random().setstate(state)
    except (TypeError, ValueError) as exc:
        raise BackendError(f"bigram state: {what} is not a valid random.Random state: {exc}") from None
    return state


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _counter(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise BackendError(f"bigram state: {what} must be a non-negative integer, got {value!r}")
    return value


def _float_table(value: Any, what: str) -> array[float]:
    if not isinstance(value, list) or len(value) != TABLE_SIZE:
        raise BackendError(f"bigram state: {what} must be a list of {TABLE_SIZE} numbers")
    if not all(_is_number(x) for x in value):
        raise BackendError(f"bigram state: {what} contains something that is not a number")
    return array("d", value)


def _log_softmax_row(row: Sequence[float]) -> tuple[list[float], float]:
    """Softmax probabilities of ``row`` and its log-sum-exp, computed stably."""
    top = max(row)
    exps = [math.exp(x - top) for x in row]
    total = math.fsum(exps)
    inv = 1.0 / total
    return [e * inv for e in exps], top + math.log(total)


PPO_CLIP = (0.8, 1.2)


def _clip(config: Mapping[str, float] | None) -> tuple[float, float]:
    """The PPO ratio bounds from a loss_fn_config (Tinker's key names)."""
    config = config or {}
    low = float(config.get("clip_low_threshold", PPO_CLIP[0]))
    high = float(config.get("clip_high_threshold", PPO_CLIP[1]))
    if not 0 < low <= 1 <= high:
        raise BackendError(f"ppo clip thresholds must satisfy 0 < low <= 1 <= high, got {low}, {high}")
    return low, high
