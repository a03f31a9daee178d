"""HE-LoRA's wire format: versioned, size-checked frames of a JSON header and binary blobs (no pickle)."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from tensafe.errors import BackendError
from tensafe.he._numpy import numpy_module as _numpy

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray


#: Frame kinds; each frame starts with ``b"TSHE-LORA-" + kind + b"\x00" + version byte``.
ADAPTER, REQUEST, RESPONSE, OWNER, PAD = b"ADAPTER", b"REQ", b"RSP", b"OWNER", b"PAD"
#: A request or response on its way over HTTP, bound to its session, generation and turn.
TURN = b"TURN"
#: The frame version this TenSafe writes and reads (2: Gaussian masks, batched modules, declared norms).
FRAME_VERSION = 2
LENGTH = struct.Struct(">Q")
MAX_HEADER = 1 << 24
#: The largest frame either party reads (an encrypted adapter of a large model, or a batched request).
MAX_FRAME = 1 << 34


def frame_magic(kind: bytes) -> bytes:
    return b"TSHE-LORA-" + kind + b"\x00"


def pack_frame(kind: bytes, header: Mapping[str, Any], blobs: Sequence[bytes]) -> bytes:
    head = json.dumps({**header, "blobs": [len(b) for b in blobs]}, sort_keys=True).encode()
    if len(head) > MAX_HEADER:
        raise BackendError("an HE-LoRA frame's header is too long")
    return b"".join([frame_magic(kind), bytes([FRAME_VERSION]), LENGTH.pack(len(head)), head, *blobs])


def read_frame(kind: bytes, data: bytes, what: str) -> tuple[dict[str, Any], list[bytes]]:
    magic = frame_magic(kind)
    if not isinstance(data, bytes | bytearray | memoryview) or not bytes(data[: len(magic)]) == magic:
        raise BackendError(f"not a serialised {what}")
    if len(data) > MAX_FRAME:
        raise BackendError(f"the {what} is larger than {MAX_FRAME} bytes")
    data = bytes(data)
    version = data[len(magic)] if len(data) > len(magic) else None
    if version != FRAME_VERSION:
        raise BackendError(
            f"the {what} is frame version {version}; this TenSafe reads version {FRAME_VERSION} "
            "(re-encrypt the adapter, or run the same TenSafe version at both parties)"
        )
    offset = len(magic) + 1
    try:
        (length,) = LENGTH.unpack_from(data, offset)
        if length > MAX_HEADER:
            raise ValueError("header too long")
        header = json.loads(data[offset + LENGTH.size : offset + LENGTH.size + length])
        sizes = header["blobs"]
        if not isinstance(header, dict) or not all(type(s) is int and s >= 0 for s in sizes):
            raise ValueError("bad blob list")
    except (struct.error, ValueError, KeyError, TypeError) as exc:
        raise BackendError(f"malformed {what}: {exc}") from None
    offset += LENGTH.size + length
    if offset + sum(sizes) != len(data):
        raise BackendError(f"malformed {what}: truncated or trailing bytes")
    blobs = []
    for size in sizes:
        blobs.append(data[offset : offset + size])
        offset += size
    return header, blobs


def peek_header(kind: bytes, data: bytes, what: str) -> dict[str, Any]:
    """A frame's header alone, checked as :func:`read_frame` checks it, without copying its blobs."""
    magic = frame_magic(kind)
    head = bytes(data[: len(magic) + 1 + LENGTH.size])
    if len(head) < len(magic) + 1 + LENGTH.size or not head.startswith(magic) or head[len(magic)] != FRAME_VERSION:
        raise BackendError(f"not a version {FRAME_VERSION} {what}")
    (length,) = LENGTH.unpack_from(head, len(magic) + 1)
    if length > MAX_HEADER:
        raise BackendError(f"malformed {what}: header too long")
    try:
        header = json.loads(bytes(data[len(head) : len(head) + length]))
    except ValueError as exc:
        raise BackendError(f"malformed {what}: {exc}") from None
    if not isinstance(header, dict):
        raise BackendError(f"malformed {what}")
    return header


def read_floats(blob: bytes, count: int, what: str) -> NDArray[np.float64]:
    np_ = _numpy()
    if len(blob) != 8 * count:
        raise BackendError(f"{what}: expected {count} float64 values, got {len(blob)} bytes")
    values = np_.frombuffer(blob, dtype="<f8").astype(np_.float64)
    if not np_.all(np_.isfinite(values)):
        raise BackendError(f"{what}: values must be finite")
    return values  # type: ignore[no-any-return]


def key_id(public_key: bytes) -> str:
    """A short, public name of a key pair: the SHA-256 of its serialised public key."""
    return hashlib.sha256(public_key).hexdigest()[:32]
