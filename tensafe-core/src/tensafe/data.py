"""Training data: JSONL records, held-out split, tokenisation and Poisson sampling."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tensafe.errors import UsageError
from tensafe.types import Datum, datum_from_sequence

SPLIT_SEED = 20240917
"""The held-out split depends only on the data, never on the run's seed."""


@dataclass(frozen=True)
class Record:
    """One training example: a prompt (may be empty) and the text to learn."""

    prompt: str
    completion: str


def load_records(path: Path, *, max_records: int | None = None) -> list[Record]:
    """Read ``{"prompt", "completion"}`` or ``{"text"}`` records from a JSONL file."""
    if not path.is_file():
        raise UsageError(f"dataset not found: {path}")
    records: list[Record] = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            records.append(_record(obj, f"{path}:{lineno}"))
            if max_records is not None and len(records) >= max_records:
                break
    if not records:
        raise UsageError(f"{path}: no records")
    return records


def _record(obj: object, where: str) -> Record:
    if not isinstance(obj, dict):
        raise UsageError(f"{where}: a record must be a JSON object")
    if "text" in obj and "completion" not in obj:
        text = obj["text"]
        if not isinstance(text, str) or not text:
            raise UsageError(f"{where}: 'text' must be a non-empty string")
        return Record("", text)
    prompt, completion = obj.get("prompt", ""), obj.get("completion")
    if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
        raise UsageError(f"{where}: expected {{'prompt': str, 'completion': str}} or {{'text': str}}")
    return Record(prompt, completion)


def split_records(records: Sequence[Record], eval_fraction: float) -> tuple[list[Record], list[Record]]:
    """Shuffle with a fixed seed and hold out ``eval_fraction`` of the records."""
    order = list(range(len(records)))
    random.Random(SPLIT_SEED).shuffle(order)
    n_eval = round(len(records) * eval_fraction)
    if eval_fraction > 0 and len(records) > 1:
        n_eval = max(1, n_eval)
    n_eval = min(n_eval, len(records) - 1)
    held = sorted(order[:n_eval])
    train = sorted(order[n_eval:])
    return [records[i] for i in train], [records[i] for i in held]


def tokenize_record(
    record: Record, encode: Callable[[str], list[int]], eos_token_id: int | None, max_len: int
) -> Datum:
    """A cross-entropy datum whose prompt tokens carry weight 0, cut to ``max_len`` tokens."""
    prompt = encode(record.prompt) if record.prompt else []
    tokens = prompt + encode(record.completion)
    if eos_token_id is not None:
        tokens.append(eos_token_id)
    tokens = tokens[:max_len]
    if len(tokens) - len(prompt) < 1 or len(tokens) < 2:
        raise UsageError(f"a record's prompt fills the whole max_seq_len ({max_len} tokens); raise model.max_seq_len")
    return datum_from_sequence(tokens, prompt_length=len(prompt))


class PoissonSampler:
    """Includes each of ``n`` records in a batch independently with probability ``q``.

    This is the sampling the privacy accountants assume; batch sizes vary and may
    be zero.
    """

    def __init__(self, n: int, sampling_rate: float, rng: random.Random) -> None:
        if n < 1:
            raise UsageError("cannot sample from an empty dataset")
        if not 0 < sampling_rate <= 1:
            raise UsageError(f"sampling rate must be in (0, 1], got {sampling_rate}")
        self.n = n
        self.sampling_rate = sampling_rate
        self._rng = rng

    def sample(self) -> list[int]:
        q, rand = self.sampling_rate, self._rng.random
        return [i for i in range(self.n) if rand() < q]
