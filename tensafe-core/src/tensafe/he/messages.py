"""HE-LoRA's messages between the evaluator and the key owner, and the transports that carry them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from tensafe.errors import BackendError, PayloadTooLarge
from tensafe.he._numpy import numpy_module as _numpy
from tensafe.he.frames import MAX_FRAME, REQUEST, RESPONSE, TURN, pack_frame, read_floats, read_frame

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

    from tensafe.he.key_owner import KeyOwner


@dataclass
class ModuleRequest:
    """The masked ciphertexts for one module and a batch of tokens."""

    module: str
    tokens: int
    rows: list[list[bytes]]
    outs: list[list[bytes]]


@dataclass
class LoraRequest:
    """One round from the evaluator: masked ciphertexts only, for one or more modules."""

    parts: list[ModuleRequest]
    key_id: str = ""

    def to_bytes(self) -> bytes:
        blobs: list[bytes] = []
        described = []
        for part in self.parts:
            per_row = len(part.rows[0]) if part.rows else 0
            per_out = len(part.outs[0]) if part.outs else 0
            if any(len(r) != per_row for r in part.rows) or any(len(o) != per_out for o in part.outs):
                raise BackendError(f"HE-LoRA request for {part.module!r}: tokens with different ciphertext counts")
            described.append({"module": part.module, "tokens": part.tokens, "per_row": per_row, "per_out": per_out})
            blobs += [b for token in part.rows for b in token] + [b for token in part.outs for b in token]
        return pack_frame(REQUEST, {"modules": described, "key_id": self.key_id}, blobs)

    @classmethod
    def from_bytes(cls, data: bytes) -> LoraRequest:
        header, blobs = read_frame(REQUEST, data, "HE-LoRA request")
        parts, offset = [], 0
        try:
            key = str(header["key_id"])
            described = [
                (str(m["module"]), int(m["tokens"]), int(m["per_row"]), int(m["per_out"])) for m in header["modules"]
            ]
        except (KeyError, TypeError, ValueError) as exc:
            raise BackendError(f"malformed HE-LoRA request: {exc}") from None
        for module, tokens, per_row, per_out in described:
            if tokens < 1 or min(per_row, per_out) < 0 or offset + tokens * (per_row + per_out) > len(blobs):
                raise BackendError("malformed HE-LoRA request: ciphertext count does not match")
            rows = [blobs[offset + t * per_row : offset + (t + 1) * per_row] for t in range(tokens)]
            offset += tokens * per_row
            outs = [blobs[offset + t * per_out : offset + (t + 1) * per_out] for t in range(tokens)]
            offset += tokens * per_out
            parts.append(ModuleRequest(module, tokens, rows, outs))
        if not parts or offset != len(blobs):
            raise BackendError("malformed HE-LoRA request: ciphertext count does not match")
        return cls(parts, key)


@dataclass
class LoraResponse:
    """The key owner's answer: per module, ``y = B A x - M'`` per token (plaintext, useless without ``M'``)."""

    values: dict[str, NDArray[np.float64]]

    def to_bytes(self) -> bytes:
        np_ = _numpy()
        names = list(self.values)
        shapes = [list(self.values[n].shape) for n in names]
        blobs = [np_.ascontiguousarray(self.values[n], "<f8").tobytes() for n in names]
        return pack_frame(RESPONSE, {"modules": names, "shapes": shapes}, blobs)

    @classmethod
    def from_bytes(cls, data: bytes) -> LoraResponse:
        header, blobs = read_frame(RESPONSE, data, "HE-LoRA response")
        try:
            names = [str(n) for n in header["modules"]]
            shapes = [(int(r), int(c)) for r, c in header["shapes"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise BackendError(f"malformed HE-LoRA response: {exc}") from None
        if len(blobs) != len(names) or len(shapes) != len(names) or min((min(s) for s in shapes), default=0) < 0:
            raise BackendError("malformed HE-LoRA response")
        return cls(
            {
                name: read_floats(blob, rows * cols, "HE-LoRA response").reshape(rows, cols)
                for name, (rows, cols), blob in zip(names, shapes, blobs, strict=True)
            }
        )


_ID = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class Turn:
    """One message of an HE generation carried over HTTP, bound to its session, its generation and its turn.

    ``payload`` is a serialised :class:`LoraRequest` (evaluator to key owner) or
    :class:`LoraResponse` (back). Each side checks the binding before it reads
    the payload: a key owner answers only its own session's requests, and an
    evaluator takes an answer only for the turn it is waiting on.
    """

    session_id: str
    generation_id: str
    turn: int
    payload: bytes

    def to_bytes(self) -> bytes:
        header = {"session": self.session_id, "generation": self.generation_id, "turn": self.turn}
        return pack_frame(TURN, header, [self.payload])

    @classmethod
    def from_bytes(cls, data: bytes, max_size: int = MAX_FRAME) -> Turn:
        if len(data) > max_size:
            raise PayloadTooLarge(f"the HE-LoRA turn is {len(data)} bytes; at most {max_size} are accepted here")
        header, blobs = read_frame(TURN, data, "HE-LoRA turn")
        session, generation, turn = header.get("session"), header.get("generation"), header.get("turn")
        if not (isinstance(session, str) and _ID.fullmatch(session)) or not (
            isinstance(generation, str) and _ID.fullmatch(generation)
        ):
            raise BackendError("malformed HE-LoRA turn: session and generation must be 32 hex digits")
        if type(turn) is not int or turn < 1 or len(blobs) != 1:
            raise BackendError("malformed HE-LoRA turn: a positive turn number and one payload expected")
        return cls(session, generation, turn, blobs[0])

    def check(self, session_id: str, generation_id: str, turn: int) -> None:
        """Refuse a turn bound to another session, generation or place in the exchange."""
        if self.session_id != session_id:
            raise BackendError("the HE-LoRA turn is bound to another session")
        if self.generation_id != generation_id:
            raise BackendError("the HE-LoRA turn belongs to another generation of this session")
        if self.turn != turn:
            raise BackendError(f"the HE-LoRA turn is number {self.turn}; turn {turn} is the one expected")


class LoraTransport(Protocol):
    """Carries a serialised request to the key owner and its serialised response back."""

    def exchange(self, request: bytes) -> bytes: ...


class InProcessTransport:
    """A transport to a key owner in the same process; messages still travel as bytes."""

    def __init__(self, key_owner: KeyOwner) -> None:
        self._key_owner = key_owner
        #: Bytes sent to and received from the key owner, and round trips (for benchmarks and audits).
        self.sent = 0
        self.received = 0
        self.rounds = 0

    def exchange(self, request: bytes) -> bytes:
        self.sent += len(request)
        self.rounds += 1
        response = self._key_owner.handle(request)
        self.received += len(response)
        return response
