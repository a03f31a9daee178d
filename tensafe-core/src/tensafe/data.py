"""Training data: JSONL records, held-out split, tokenisation and Poisson sampling."""

from __future__ import annotations

import hashlib
import hmac
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tensafe.errors import UsageError
from tensafe.types import Datum, datum_from_sequence

if TYPE_CHECKING:
    from tensafe.interfaces import MLBackend

SPLIT_KEY = b"tensafe-held-out-split-1"
"""Keys the hash that decides, per record, whether it is held out (public: the split is not a secret)."""


@dataclass(frozen=True)
class Record:
    """One training example: a prompt (may be empty) and the text to learn.

    ``line`` is the record's 1-based line number in its file (0 when it came
    from elsewhere), so a report can name held-out records without their text.
    """

    prompt: str
    completion: str
    line: int = 0
    #: A chat record's turns as (role, content); prompt and completion are then empty.
    messages: tuple[tuple[str, str], ...] = ()

    def canonical(self) -> bytes:
        """The record's content as canonical JSON bytes (its line number left out)."""
        content: list[Any] = [self.prompt, self.completion]
        if self.messages:
            content.append([list(m) for m in self.messages])
        return json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode()


def load_records(path: Path, *, max_records: int | None = None) -> list[Record]:
    """Read ``{"prompt", "completion"}`` or ``{"text"}`` records from a JSONL file."""
    if not path.is_file():
        raise UsageError(f"dataset not found: {path}")
    with path.open(encoding="utf-8") as handle:
        return parse_records(handle, str(path), max_records=max_records)


def parse_records(lines: Iterable[str], where: str, *, max_records: int | None = None) -> list[Record]:
    """Records from JSONL lines; errors name ``where`` and the line."""
    records: list[Record] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{where}:{lineno}: not valid JSON ({exc.msg})") from None
        records.append(_record(obj, f"{where}:{lineno}", lineno))
        if max_records is not None and len(records) >= max_records:
            break
    if not records:
        raise UsageError(f"{where}: no records")
    return records


CHAT_ROLES = ("system", "user", "assistant")


def _chat_record(messages: object, where: str, line: int) -> Record:
    if not isinstance(messages, list) or not messages:
        raise UsageError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) - {"role", "content"}:
            raise UsageError(f"{where}: messages[{i}] must be an object with 'role' and 'content' only")
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES or not isinstance(content, str):
            raise UsageError(f"{where}: messages[{i}] needs a role in {CHAT_ROLES} and a string content")
        turns.append((role, content))
    if not any(role == "assistant" and content for role, content in turns):
        raise UsageError(f"{where}: a chat record needs an assistant turn to learn from")
    return Record("", "", line, tuple(turns))


def _record(obj: object, where: str, line: int) -> Record:
    if not isinstance(obj, dict):
        raise UsageError(f"{where}: a record must be a JSON object")
    if "messages" in obj:
        if set(obj) != {"messages"}:
            raise UsageError(f"{where}: a chat record holds 'messages' only")
        return _chat_record(obj["messages"], where, line)
    if "text" in obj and "completion" not in obj:
        text = obj["text"]
        if not isinstance(text, str) or not text:
            raise UsageError(f"{where}: 'text' must be a non-empty string")
        return Record("", text, line)
    prompt, completion = obj.get("prompt", ""), obj.get("completion")
    if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
        raise UsageError(
            f"{where}: expected {{'prompt': str, 'completion': str}}, {{'text': str}} or {{'messages': [...]}}"
        )
    return Record(prompt, completion, line)


def held_out(record: Record, eval_fraction: float) -> bool:
    """Whether ``record`` belongs to the held-out split: a keyed hash of its content below ``eval_fraction``.

    The decision depends on the record alone, so adding or removing one record
    moves no other between the training and held-out sets.
    """
    digest = hmac.new(SPLIT_KEY, record.canonical(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") < eval_fraction * 2**64


def split_records(records: Sequence[Record], eval_fraction: float) -> tuple[list[Record], list[Record]]:
    """``(training, held-out)`` records, each decided per record by :func:`held_out`, in file order."""
    train = [r for r in records if not held_out(r, eval_fraction)]
    held = [r for r in records if held_out(r, eval_fraction)]
    if not train:
        raise UsageError(
            f"all {len(records)} records fell into the held-out split; lower data.eval_fraction or add records"
        )
    return train, held


def records_digest(records: Sequence[Record], key: bytes) -> str:
    """A keyed commitment to ``records`` (in order): HMAC-SHA256 under ``key``, which stays with the data.

    Without the key it says nothing about the records; with it, the data owner
    can show which records a certificate covers.
    """
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for record in records:
        body = record.canonical()
        mac.update(len(body).to_bytes(8, "big") + body)
    return "hmac-sha256:" + mac.hexdigest()


def weight_total(data: Sequence[Datum]) -> float:
    """How many tokens a batch's cross-entropy loss counts (its summed weights)."""
    return sum(sum(d.values("weights", 1.0)) for d in data)


def tokenize_record(record: Record, backend: MLBackend, eos_token_id: int | None, max_len: int) -> Datum:
    """A cross-entropy datum, cut to ``max_len`` tokens, whose loss counts only what is to be learned.

    Prompt/completion and text records: the completion (and EOS); the prompt's
    tokens carry weight 0. Chat records: the assistant turns, as the backend's
    chat template marks them.
    """
    if record.messages:
        return _tokenize_chat(record, backend, max_len)
    prompt = backend.encode(record.prompt) if record.prompt else []
    tokens = prompt + backend.encode(record.completion)
    if eos_token_id is not None:
        tokens.append(eos_token_id)
    tokens = tokens[:max_len]
    if len(tokens) - len(prompt) < 1 or len(tokens) < 2:
        raise UsageError(f"a record's prompt fills the whole max_seq_len ({max_len} tokens); raise model.max_seq_len")
    return datum_from_sequence(tokens, prompt_length=len(prompt))


def _tokenize_chat(record: Record, backend: MLBackend, max_len: int) -> Datum:
    from tensafe import capabilities

    if not capabilities.has(backend, capabilities.CHAT_TEMPLATE):
        raise UsageError(
            f"line {record.line}: chat records need an ML backend with the 'chat_template' capability; "
            f"{type(backend).__name__} has none"
        )
    tokens, assistant = backend.encode_chat([{"role": role, "content": text} for role, text in record.messages])
    tokens, assistant = tokens[:max_len], assistant[:max_len]
    weights = [1.0 if flag else 0.0 for flag in assistant[1:]]
    if len(tokens) < 2 or not any(weights):
        raise UsageError(
            f"line {record.line}: no assistant token within model.max_seq_len ({max_len} tokens); raise it"
        )
    return Datum(model_input=list(tokens[:-1]), loss_fn_inputs={"target_tokens": list(tokens[1:]), "weights": weights})


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
