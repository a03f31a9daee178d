"""Canonical JSON: the one byte encoding of a JSON value that TGSP signs and stores.

A value is encoded as ``json.dumps(value, sort_keys=True, separators=(",", ":"),
ensure_ascii=False, allow_nan=False)`` encoded as UTF-8: object keys sorted by
code point, no whitespace, non-ASCII characters written as UTF-8 (only ``"``,
``\\`` and control characters are escaped), finite numbers only. Only ``dict``
(with ``str`` keys), ``list``, ``str``, ``int`` (within ±2**63), finite
``float``, ``bool`` and ``None`` are allowed, nested at most :data:`MAX_DEPTH`
deep. Decoding is strict: invalid UTF-8, a byte-order mark, duplicate keys,
``NaN``/``Infinity`` and bytes that are not exactly the canonical encoding of
what they decode to are all rejected.
"""

from __future__ import annotations

import json
import math
from typing import Any

from tensafe_tgsp.errors import TGSPError

MAX_DEPTH = 32
INT_LIMIT = 2**63


def _check(value: Any, depth: int, error: type[TGSPError], where: str) -> None:
    if depth > MAX_DEPTH:
        raise error(f"{where}: nested deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, (bool, str)):
        return
    if isinstance(value, int):
        if not -INT_LIMIT < value < INT_LIMIT:
            raise error(f"{where}: integer out of range")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise error(f"{where}: numbers must be finite")
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check(item, depth + 1, error, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise error(f"{where}: object keys must be strings, not {type(key).__name__}")
            _check(item, depth + 1, error, f"{where}.{key}")
        return
    raise error(f"{where}: {type(value).__name__} is not a JSON value")


def canonical_json(value: Any, *, error: type[TGSPError], what: str = "value") -> bytes:
    """The canonical encoding of ``value``; raises ``error`` when it is not plain, finite JSON."""
    _check(value, 0, error, what)
    try:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        return text.encode("utf-8")
    except (TypeError, ValueError, UnicodeError, RecursionError) as exc:
        raise error(f"{what}: cannot be encoded as canonical JSON: {exc}") from None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def load_json(data: bytes, *, error: type[TGSPError], what: str = "value", canonical: bool = False) -> Any:
    """Decode JSON strictly; with ``canonical``, also require ``data`` to be the canonical encoding."""
    try:
        text = data.decode("utf-8", errors="strict")
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except (UnicodeError, ValueError, RecursionError) as exc:
        raise error(f"{what}: not valid JSON: {exc}") from None
    if canonical:
        if canonical_json(value, error=error, what=what) != data:
            raise error(f"{what}: not in canonical form (sorted keys, no whitespace, UTF-8)")
    else:
        _check(value, 0, error, what)
    return value
