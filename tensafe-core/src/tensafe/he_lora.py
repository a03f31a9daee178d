"""HE-LoRA: a LoRA product computed on an encrypted adapter, with no rotations.

Two parties, separated by bytes:

* the **key owner** holds the CKKS secret key and the plaintext adapter. It
  encrypts each module's A rows and B columns (:meth:`KeyOwner.encrypt_adapter`)
  and ships them, with the public parameters and public key only, to
* the **evaluator**, which runs the base model in plaintext. For each token
  and adapted module it computes, with plaintext-ciphertext products only,

  - ``c = Enc(A rows) * x + Enc(m)`` where each row's mask ``m_i`` is fresh,
    Gaussian and sums (over the row's slots) to a fresh Gaussian ``t_i``;
  - ``e = sum_i Enc(B column i) * t_i + Enc(M)`` with a fresh Gaussian mask ``M``,

  (the masks are fresh public-key encryptions, with random imaginary parts:
  they re-randomise what is sent, see THREAT_MODEL.md), and sends ``c`` and
  ``e`` (:class:`LoraRequest`). The key owner decrypts, sums each row's slots
  to ``w = A x + t``, sums ``e``'s segments to ``z = B t + M'`` and returns
  ``y = B w - z = B A x - M'`` plus a little flooding noise
  (:class:`LoraResponse`). The evaluator adds its ``M'`` back and scales:
  ``delta = (alpha / r) * (y + M')``.

Several rows (columns) share a ciphertext, each in its own segment of slots,
when a row is shorter than the slot count; a longer row is split into chunks.
The key owner sums segments in plaintext after decryption, which is what makes
rotations unnecessary: ``r`` plaintext-ciphertext products per token and
module when ``d`` equals the slot count, the least SIMD work possible.

``tensafe-he-seal/THREAT_MODEL.md`` says what each party sees, the statistical
hiding the masks give (:mod:`tensafe.he.hiding` computes it), and what HE
cannot protect here. Everything crosses between the parties as versioned,
size-checked byte frames through a :class:`LoraTransport`, one round trip for
all the modules of a token whose inputs are ready together
(:meth:`Evaluator.deltas`); the in-process transport still serialises every
message, so the evaluator's state never shares an object with the key owner's.
Masks can be encrypted ahead of time in worker processes (:mod:`tensafe.he.pool`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from tensafe.errors import BackendError, MissingDependencyError, UsageError
from tensafe.he import state as sealed_state
from tensafe.he.hiding import AdapterNorms, HidingLedger, MaskBits, gaussian

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

    from tensafe.config import HEConfig
    from tensafe.he.pool import MaskPool
    from tensafe.interfaces import HEBackend

__all__ = [
    "ENCRYPTED_ADAPTER_FILE",
    "PROTOCOL",
    "Evaluator",
    "InProcessTransport",
    "KeyOwner",
    "KeyRotationRequired",
    "Layout",
    "LoraRequest",
    "LoraResponse",
    "LoraTransport",
    "MaskBits",
    "ModuleRequest",
    "ModuleSpec",
    "PadMaker",
    "adapter_marker",
    "in_process",
    "key_id",
    "lora_scales",
    "open_encrypted",
    "seal_unencrypted_state",
]

#: Frame kinds; each frame starts with ``b"TSHE-LORA-" + kind + b"\x00" + version byte``.
ADAPTER, REQUEST, RESPONSE, OWNER, PAD = b"ADAPTER", b"REQ", b"RSP", b"OWNER", b"PAD"
#: The frame version this TenSafe writes and reads (2: Gaussian masks, batched modules, declared norms).
FRAME_VERSION = 2
LENGTH = struct.Struct(">Q")
MAX_HEADER = 1 << 24
#: Scale of the per-token plaintexts: x and t encode to about 2^-24 per slot, far below the flood.
TOKEN_SCALE_BITS = 30
#: The largest frame either party reads (an encrypted adapter of a large model, or a batched request).
MAX_FRAME = 1 << 34
#: Levels an adapter ciphertext needs: one plaintext product, no rescale (see THREAT_MODEL.md).
LORA_LEVEL = 2
#: Bits between the product's scale and the level's modulus: room for masked values and a margin.
VALUE_ROOM_BITS = 30
#: log2 of the width of the uniform noise the key owner adds to each value it returns; at least 2^4 times
#: the decoder's float64 rounding on y with the default masks (a test measures it).
FLOOD_BITS = -19
#: Ciphertexts a key pair decrypts before the key owner refuses and asks for a rotation (THREAT_MODEL.md).
DECRYPTION_LIMIT = 1 << 20


class KeyRotationRequired(UsageError):
    """The key owner has decrypted :data:`DECRYPTION_LIMIT` ciphertexts under its key pair."""

    code = "he_key_rotation"


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:  # pragma: no cover - numpy comes with every HE backend
        raise MissingDependencyError("HE-LoRA needs numpy: pip install numpy") from None
    return numpy


@dataclass(frozen=True)
class Layout:
    """How ``count`` vectors of length ``dim`` are packed into ciphertexts of ``slots`` slots.

    A vector longer than ``slots`` is cut into ``chunks`` chunks of ``chunk``
    values (the last zero-padded); each (vector, chunk) pair is a segment, and
    ``per_ct`` segments share a ciphertext, back to back.
    """

    dim: int
    count: int
    slots: int

    @property
    def chunks(self) -> int:
        return -(-self.dim // self.slots)

    @property
    def chunk(self) -> int:
        return -(-self.dim // self.chunks)

    @property
    def per_ct(self) -> int:
        return self.slots // self.chunk

    @property
    def segments(self) -> int:
        return self.count * self.chunks

    @property
    def ciphertexts(self) -> int:
        return -(-self.segments // self.per_ct)

    def placed(self, ct: int) -> list[tuple[int, int, int, int]]:
        """``(vector, chunk index, slot offset, length)`` of each segment in ciphertext ``ct``."""
        out = []
        first = ct * self.per_ct
        for k, segment in enumerate(range(first, min(first + self.per_ct, self.segments))):
            vector, chunk = divmod(segment, self.chunks)
            start = chunk * self.chunk
            out.append((vector, chunk, k * self.chunk, min(self.chunk, self.dim - start)))
        return out

    def pack(self, vectors: NDArray[np.float64], ct: int) -> NDArray[np.float64]:
        """The slots of ciphertext ``ct`` for ``vectors`` (shape ``(count, dim)``)."""
        np_ = _numpy()
        slots = np_.zeros(self.slots)
        for vector, chunk, offset, length in self.placed(ct):
            slots[offset : offset + length] = vectors[vector, chunk * self.chunk : chunk * self.chunk + length]
        return slots  # type: ignore[no-any-return]

    def spread(self, x: NDArray[np.float64], ct: int) -> NDArray[np.float64]:
        """The slots of ciphertext ``ct`` with each segment holding its chunk of the one vector ``x``."""
        np_ = _numpy()
        slots = np_.zeros(self.slots)
        for _, chunk, offset, length in self.placed(ct):
            slots[offset : offset + length] = x[chunk * self.chunk : chunk * self.chunk + length]
        return slots  # type: ignore[no-any-return]

    def to_json(self) -> dict[str, int]:
        return {"dim": self.dim, "count": self.count, "slots": self.slots}


@dataclass(frozen=True)
class ModuleSpec:
    """One adapted module: shapes, scaling and the layouts of its A rows and B columns."""

    name: str
    d_in: int
    d_out: int
    rank: int
    scaling: float
    slots: int

    @property
    def a_layout(self) -> Layout:
        return Layout(self.d_in, self.rank, self.slots)

    @property
    def b_layout(self) -> Layout:
        return Layout(self.d_out, self.rank, self.slots)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "d_in": self.d_in,
            "d_out": self.d_out,
            "rank": self.rank,
            "scaling": self.scaling,
            "slots": self.slots,
        }

    @classmethod
    def from_json(cls, data: Any) -> ModuleSpec:
        try:
            spec = cls(
                str(data["name"]),
                int(data["d_in"]),
                int(data["d_out"]),
                int(data["rank"]),
                float(data["scaling"]),
                int(data["slots"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BackendError(f"malformed HE-LoRA module description: {exc}") from None
        if min(spec.d_in, spec.d_out, spec.rank, spec.slots) < 1 or max(spec.d_in, spec.d_out) > 1 << 20:
            raise BackendError(f"HE-LoRA module {spec.name!r} has impossible shapes")
        if spec.rank > 4096 or not math.isfinite(spec.scaling):
            raise BackendError(f"HE-LoRA module {spec.name!r} has an impossible rank or scaling")
        return spec


# -- framing: versioned, size-checked; a JSON header and binary blobs, no pickle -----------


def _magic(kind: bytes) -> bytes:
    return b"TSHE-LORA-" + kind + b"\x00"


def _frame(kind: bytes, header: Mapping[str, Any], blobs: Sequence[bytes]) -> bytes:
    head = json.dumps({**header, "blobs": [len(b) for b in blobs]}, sort_keys=True).encode()
    if len(head) > MAX_HEADER:
        raise BackendError("an HE-LoRA frame's header is too long")
    return b"".join([_magic(kind), bytes([FRAME_VERSION]), LENGTH.pack(len(head)), head, *blobs])


def _unframe(kind: bytes, data: bytes, what: str) -> tuple[dict[str, Any], list[bytes]]:
    magic = _magic(kind)
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


def _floats(blob: bytes, count: int, what: str) -> NDArray[np.float64]:
    np_ = _numpy()
    if len(blob) != 8 * count:
        raise BackendError(f"{what}: expected {count} float64 values, got {len(blob)} bytes")
    values = np_.frombuffer(blob, dtype="<f8").astype(np_.float64)
    if not np_.all(np_.isfinite(values)):
        raise BackendError(f"{what}: values must be finite")
    return values  # type: ignore[no-any-return]


# -- scales ------------------------------------------------------------------------------


def lora_scales(backend: HEBackend) -> tuple[int, int]:
    """``(adapter scale bits, per-token plaintext scale bits)`` for this context.

    The product of the two leaves :data:`VALUE_ROOM_BITS` below the modulus of
    level :data:`LORA_LEVEL`. The per-token plaintexts (``x``, ``t``) need only
    :data:`TOKEN_SCALE_BITS`; the adapter takes the rest, because its encryption
    noise is multiplied by the masks' sums ``t`` in ``e``.
    """
    if backend.top_level < LORA_LEVEL:
        raise UsageError(f"HE-LoRA needs at least {LORA_LEVEL} data primes (he.coeff_mod_bit_sizes has too few)")
    bits = backend.modulus_bits(LORA_LEVEL)
    product = bits - VALUE_ROOM_BITS
    if product < 60:
        raise UsageError(
            f"HE-LoRA needs the first two primes to total at least {60 + VALUE_ROOM_BITS} bits, not {bits}"
        )
    return product - TOKEN_SCALE_BITS, TOKEN_SCALE_BITS


def _uniform(shape: tuple[int, ...], bits: int) -> NDArray[np.float64]:
    """Uniform reals in [-2^bits, 2^bits] from the operating system's CSPRNG."""
    np_ = _numpy()
    count = int(math.prod(shape))
    raw = np_.frombuffer(os.urandom(8 * count), dtype="<u8")
    unit = (raw >> np_.uint64(11)).astype(np_.float64) * (2.0**-53)  # uniform in [0, 1) with 53 random bits
    return ((unit * 2.0 - 1.0) * 2.0**bits).reshape(shape)  # type: ignore[no-any-return]


# -- messages ----------------------------------------------------------------------------


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
        return _frame(REQUEST, {"modules": described, "key_id": self.key_id}, blobs)

    @classmethod
    def from_bytes(cls, data: bytes) -> LoraRequest:
        header, blobs = _unframe(REQUEST, data, "HE-LoRA request")
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
        return _frame(RESPONSE, {"modules": names, "shapes": shapes}, blobs)

    @classmethod
    def from_bytes(cls, data: bytes) -> LoraResponse:
        header, blobs = _unframe(RESPONSE, data, "HE-LoRA response")
        try:
            names = [str(n) for n in header["modules"]]
            shapes = [(int(r), int(c)) for r, c in header["shapes"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise BackendError(f"malformed HE-LoRA response: {exc}") from None
        if len(blobs) != len(names) or len(shapes) != len(names) or min((min(s) for s in shapes), default=0) < 0:
            raise BackendError("malformed HE-LoRA response")
        return cls(
            {
                name: _floats(blob, rows * cols, "HE-LoRA response").reshape(rows, cols)
                for name, (rows, cols), blob in zip(names, shapes, blobs, strict=True)
            }
        )


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


# -- the key owner -----------------------------------------------------------------------


@dataclass
class _OwnedModule:
    spec: ModuleSpec
    b: NDArray[np.float64]  # (d_out, rank)


class KeyOwner:
    """Holds the secret key and the plaintext adapter; decrypts only masked values.

    It refuses to put its secret key into any frame it hands out, and refuses to
    decrypt past :data:`DECRYPTION_LIMIT` ciphertexts per key pair
    (:meth:`rotate` re-encrypts the adapter under fresh keys).
    """

    def __init__(self, backend: HEBackend, *, decryption_limit: int = DECRYPTION_LIMIT) -> None:
        if not backend.has_key("secret"):
            raise UsageError("the HE-LoRA key owner needs a context with its secret key")
        self._backend = backend
        self._modules: dict[str, _OwnedModule] = {}
        self._config: HEConfig | None = None
        #: Ciphertexts decrypted under the current key pair.
        self.decryptions = 0
        self.decryption_limit = decryption_limit
        self._secret_marker = self._marker()

    def _marker(self) -> bytes:
        """A stretch of the serialised secret key's coefficients that no outgoing frame may contain."""
        secret = self._backend.serialize_key("secret")
        middle = len(secret) // 2
        return secret[middle : middle + 64]

    @classmethod
    def create(cls, backend: HEBackend, config: HEConfig, *, decryption_limit: int = DECRYPTION_LIMIT) -> KeyOwner:
        """Fresh keys: public and secret only; no relinearisation or Galois keys, the protocol needs neither."""
        backend.create_context(config, rotations=(), relinearization=False)
        lora_scales(backend)  # refuse parameters the protocol cannot run on, before any work
        owner = cls(backend, decryption_limit=decryption_limit)
        owner._config = config
        return owner

    @property
    def backend(self) -> HEBackend:
        return self._backend

    @property
    def key_id(self) -> str:
        """Names the key pair: requests for adapters encrypted under another key are refused."""
        return key_id(self._backend.serialize_key("public"))

    def _release(self, frame: bytes) -> bytes:
        """Hand out ``frame`` only if the secret key's bytes are nowhere in it."""
        if self._secret_marker in frame:
            raise BackendError("refusing to send a frame that contains the key owner's secret key")
        return frame

    def encrypt_adapter(self, modules: Mapping[str, tuple[Any, Any, float]]) -> bytes:
        """Encrypt ``{name: (A, B, scaling)}`` (A is r x d_in, B is d_out x r) for an evaluator.

        The result holds the public parameters, the public key, the ciphertexts
        at the lowest level the protocol needs, and each module's declared norms
        (:class:`tensafe.he.hiding.AdapterNorms`); never the secret key.
        """
        np_ = _numpy()
        backend = self._backend
        adapter_bits, _ = lora_scales(backend)
        header_modules, blobs = [], [backend.serialize_context(), backend.serialize_key("public")]
        for name, (a_raw, b_raw, scaling) in sorted(modules.items()):
            a = np_.asarray(a_raw, dtype=np_.float64)
            b = np_.asarray(b_raw, dtype=np_.float64)
            if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
                raise UsageError(f"module {name!r}: A must be r x d_in and B d_out x r, got {a.shape} and {b.shape}")
            if not (np_.all(np_.isfinite(a)) and np_.all(np_.isfinite(b))):
                raise UsageError(f"module {name!r}: the adapter has non-finite weights")
            spec = ModuleSpec(name, a.shape[1], b.shape[0], a.shape[0], float(scaling), backend.slot_count)
            cts = [
                self._encrypt_at_lora_level(spec.a_layout.pack(a, k), adapter_bits)
                for k in range(spec.a_layout.ciphertexts)
            ]
            cts += [
                self._encrypt_at_lora_level(spec.b_layout.pack(b.T, k), adapter_bits)
                for k in range(spec.b_layout.ciphertexts)
            ]
            header_modules.append({**spec.to_json(), "norms": AdapterNorms.of(a, b, spec.a_layout.chunk).to_json()})
            blobs.extend(cts)
            self._modules[name] = _OwnedModule(spec, b)
        return self._release(_frame(ADAPTER, {"modules": header_modules, "key_id": self.key_id}, blobs))

    def _encrypt_at_lora_level(self, slots: NDArray[np.float64], scale_bits: int) -> bytes:
        backend = self._backend
        ct = backend.encrypt(slots, scale_bits=scale_bits)
        while backend.level(ct) > LORA_LEVEL:
            ct = backend.mod_switch(ct)  # fewer primes, fewer bytes, same scale
        return backend.serialize_ciphertext(ct)

    def rotate(self, adapter: bytes, config: HEConfig | None = None) -> bytes:
        """Fresh keys, and ``adapter`` (encrypted under the old ones) re-encrypted under them.

        A is recovered by decrypting the old adapter (its rows at scale 2^50 come
        back to about 2^-40); B is the key owner's own plaintext. The decryption
        count starts again at zero.
        """
        np_ = _numpy()
        header, blobs = _unframe(ADAPTER, adapter, "encrypted HE-LoRA adapter")
        if header.get("key_id") != self.key_id:
            raise BackendError("the adapter to rotate was not encrypted under this key owner's keys")
        modules: dict[str, tuple[Any, Any, float]] = {}
        offset = 2
        for raw in header.get("modules", []):
            spec = ModuleSpec.from_json(raw)
            owned = self._modules.get(spec.name)
            if owned is None:
                raise BackendError(f"the key owner has no adapter module {spec.name!r}")
            a = np_.zeros((spec.rank, spec.d_in))
            layout = spec.a_layout
            for k in range(layout.ciphertexts):
                slots = self._backend.decrypt(self._backend.deserialize_ciphertext(blobs[offset + k]))
                for row, chunk, offset_in, length in layout.placed(k):
                    start = chunk * layout.chunk
                    a[row, start : start + length] = slots[offset_in : offset_in + length]
            offset += layout.ciphertexts + spec.b_layout.ciphertexts
            modules[spec.name] = (a, owned.b, spec.scaling)
        config = config or self._config
        if config is None:
            raise UsageError("rotating keys needs the HE parameters (he config) the key owner was created with")
        fresh = KeyOwner.create(type(self._backend)(), config, decryption_limit=self.decryption_limit)
        rotated = fresh.encrypt_adapter(modules)
        self._backend, self._modules, self.decryptions = fresh._backend, fresh._modules, 0
        self._secret_marker = fresh._secret_marker
        return rotated

    def handle(self, request: bytes) -> bytes:
        """Answer one serialised :class:`LoraRequest` with a serialised :class:`LoraResponse`."""
        return self._release(self.respond(LoraRequest.from_bytes(request)).to_bytes())

    def respond(self, request: LoraRequest) -> LoraResponse:
        """``y = B w - z + f`` for every module and token of ``request``; ``f`` floods the decoder's rounding."""
        answers = self.unflooded(request)
        return LoraResponse({name: y + _uniform(y.shape, FLOOD_BITS) for name, y in answers.items()})

    def unflooded(self, request: LoraRequest) -> dict[str, NDArray[np.float64]]:
        """``B w - z`` per module, before flooding: what tests compare the flood with; never sent."""
        if request.key_id != self.key_id:
            raise BackendError("the request is for an adapter encrypted under another key pair than this key owner's")
        count = 0
        for part in request.parts:
            owned = self._modules.get(part.module)
            if owned is None:
                raise BackendError(f"the key owner has no adapter module {part.module!r}")
            expected = (owned.spec.a_layout.ciphertexts, len(_out_groups(owned.spec.b_layout)))
            if any((len(r), len(o)) != expected for r, o in zip(part.rows, part.outs, strict=True)):
                raise BackendError(f"HE-LoRA request for {part.module!r} has the wrong number of ciphertexts")
            count += part.tokens * sum(expected)
        if self.decryptions + count > self.decryption_limit:
            raise KeyRotationRequired(
                f"this key pair has decrypted {self.decryptions} ciphertexts; answering would pass the limit of "
                f"{self.decryption_limit}: rotate the keys (KeyOwner.rotate re-encrypts the adapter) and give the "
                "evaluator the new encrypted adapter"
            )
        self.decryptions += count
        return {part.module: self._answer(self._modules[part.module], part) for part in request.parts}

    def _answer(self, owned: _OwnedModule, part: ModuleRequest) -> NDArray[np.float64]:
        np_ = _numpy()
        spec, backend = owned.spec, self._backend
        a_layout, b_layout = spec.a_layout, spec.b_layout
        groups = _out_groups(b_layout)
        out = np_.empty((part.tokens, spec.d_out))
        for t in range(part.tokens):
            w = np_.zeros(spec.rank)
            for k, blob in enumerate(part.rows[t]):
                slots = backend.decrypt(self._checked(blob))
                for row, _, offset, length in a_layout.placed(k):
                    w[row] += float(np_.sum(slots[offset : offset + length]))
            z = np_.zeros(b_layout.chunks * b_layout.chunk)
            for blob, members in zip(part.outs[t], groups, strict=True):
                slots = backend.decrypt(self._checked(blob))
                for _, chunk, offset, length in b_layout.placed(members[0]):
                    z[chunk * b_layout.chunk : chunk * b_layout.chunk + length] += slots[offset : offset + length]
            out[t] = owned.b @ w - z[: spec.d_out]
        return out  # type: ignore[no-any-return]

    def _checked(self, blob: bytes) -> Any:
        backend = self._backend
        ct = backend.deserialize_ciphertext(blob)
        if backend.level(ct) != LORA_LEVEL:
            raise BackendError(f"HE-LoRA ciphertexts must be at level {LORA_LEVEL}, not {backend.level(ct)}")
        return ct

    # -- persistence: the key owner's own secret state, sealed at rest -----------------

    def save(self, passphrase: str | bytes) -> bytes:
        """The key owner's state (secret key, plaintext B matrices, decryption count), sealed under ``passphrase``."""
        np_ = _numpy()
        backend = self._backend
        blobs = [backend.serialize_context(), backend.serialize_key("secret"), backend.serialize_key("public")]
        specs = []
        for name in sorted(self._modules):
            owned = self._modules[name]
            specs.append(owned.spec.to_json())
            blobs.append(np_.ascontiguousarray(owned.b, "<f8").tobytes())
        config = None if self._config is None else self._config.model_dump(mode="json", exclude={"key_owner_state"})
        header = {
            "modules": specs,
            "decryptions": self.decryptions,
            "decryption_limit": self.decryption_limit,
            "config": config,
        }
        return sealed_state.seal(_frame(OWNER, header, blobs), passphrase)

    @classmethod
    def load(cls, backend: HEBackend, data: bytes, passphrase: str | bytes | None) -> KeyOwner:
        """A key owner from a sealed state; a clear error for a wrong passphrase or an unencrypted state."""
        header, blobs = _unframe(OWNER, sealed_state.unseal(data, passphrase), "HE-LoRA key owner state")
        specs = [ModuleSpec.from_json(m) for m in header.get("modules", [])]
        if len(blobs) != 3 + len(specs):
            raise BackendError("malformed HE-LoRA key owner state")
        backend.load_context(blobs[0])
        backend.load_key("secret", blobs[1])
        backend.load_key("public", blobs[2])
        owner = cls(backend, decryption_limit=int(header.get("decryption_limit", DECRYPTION_LIMIT)))
        owner.decryptions = int(header.get("decryptions", 0))
        if isinstance(header.get("config"), dict):
            from tensafe.config import HEConfig

            owner._config = HEConfig.model_validate(header["config"])
        for spec, blob in zip(specs, blobs[3:], strict=True):
            owner._modules[spec.name] = _OwnedModule(
                spec, _floats(blob, spec.d_out * spec.rank, spec.name).reshape(spec.d_out, spec.rank)
            )
        return owner


def seal_unencrypted_state(data: bytes, passphrase: str | bytes) -> bytes:
    """A key owner state that TenSafe 0.2 wrote unencrypted, sealed under ``passphrase``.

    The old frame differs from today's only in its magic (no version byte), so the
    body is kept as it is; the decryption count starts at zero, as it was not kept.
    """
    if not sealed_state.is_unencrypted(data):
        raise UsageError("not an unencrypted TenSafe 0.2 HE-LoRA key owner state")
    body = bytes(data[len(sealed_state.PLAIN_MAGIC) :])
    header, blobs = _unframe(OWNER, _magic(OWNER) + bytes([FRAME_VERSION]) + body, "unencrypted key owner state")
    state = _frame(OWNER, {"modules": header.get("modules", []), "decryptions": 0}, blobs)
    return sealed_state.seal(state, passphrase)


def key_id(public_key: bytes) -> str:
    """A short, public name of a key pair: the SHA-256 of its serialised public key."""
    return hashlib.sha256(public_key).hexdigest()[:32]


def _out_groups(layout: Layout) -> list[list[int]]:
    """B ciphertexts whose segments map slot-for-slot onto the same output chunks: their products add up."""
    groups: dict[tuple[tuple[int, int, int], ...], list[int]] = {}
    for k in range(layout.ciphertexts):
        signature = tuple((chunk, offset, length) for _, chunk, offset, length in layout.placed(k))
        groups.setdefault(signature, []).append(k)
    return list(groups.values())


# -- the evaluator's public adapter and its offline work -----------------------------------


@dataclass
class Pad:
    """One token's precomputed masks for one module (used once, then dropped)."""

    row_masks: list[Any]
    outs: list[bytes]
    unmask: NDArray[np.float64]


@dataclass
class _EncryptedModule:
    spec: ModuleSpec
    norms: AdapterNorms
    a: list[Any]
    b: list[Any]
    groups: list[list[int]] = field(default_factory=list)


class PadMaker:
    """The public side of an encrypted adapter, and the offline work on it: masks and ``e``.

    Holds the public parameters, the public key and the adapter's ciphertexts,
    never a secret key. The evaluator has one; each worker of a
    :class:`tensafe.he.pool.MaskPool` has its own.
    """

    def __init__(self, backend: HEBackend, adapter: bytes, masks: MaskBits | None = None) -> None:
        header, blobs = _unframe(ADAPTER, adapter, "encrypted HE-LoRA adapter")
        if len(blobs) < 2:
            raise BackendError("malformed encrypted HE-LoRA adapter: no public parameters")
        backend.load_context(blobs[0])
        backend.load_key("public", blobs[1])
        if backend.has_key("secret"):
            raise UsageError("an HE-LoRA evaluator must not hold a secret key")
        self.backend = backend
        self.key_id = str(header.get("key_id", ""))
        if self.key_id != key_id(blobs[1]):
            raise BackendError("the encrypted adapter's key id does not match its public key")
        self.masks = masks or MaskBits()
        self.adapter_bits, self.token_bits = lora_scales(backend)
        self.modules: dict[str, _EncryptedModule] = {}
        offset = 2
        for raw in header.get("modules", []):
            spec = ModuleSpec.from_json(raw)
            norms = AdapterNorms.from_json(raw.get("norms") if isinstance(raw, dict) else None)
            if spec.slots != backend.slot_count:
                raise BackendError(f"module {spec.name!r} was packed for {spec.slots} slots, not {backend.slot_count}")
            n_a, n_b = spec.a_layout.ciphertexts, spec.b_layout.ciphertexts
            if offset + n_a + n_b > len(blobs):
                raise BackendError("malformed encrypted HE-LoRA adapter: too few ciphertexts")
            cts = [self._adapter_ct(b) for b in blobs[offset : offset + n_a + n_b]]
            offset += n_a + n_b
            self.modules[spec.name] = _EncryptedModule(spec, norms, cts[:n_a], cts[n_a:], _out_groups(spec.b_layout))
        if offset != len(blobs):
            raise BackendError("malformed encrypted HE-LoRA adapter: trailing ciphertexts")
        self.plain_products = 0

    def _adapter_ct(self, blob: bytes) -> Any:
        """An adapter ciphertext at exactly the protocol's level and scale: a key owner cannot inflate A's
        values by declaring a smaller scale than it encoded them at."""
        ct = self.backend.deserialize_ciphertext(blob)
        if self.backend.level(ct) != LORA_LEVEL:
            raise BackendError(f"adapter ciphertexts must be at level {LORA_LEVEL}")
        if abs(self.backend.scale_bits(ct) - self.adapter_bits) > 1e-9:
            raise BackendError(
                f"adapter ciphertexts must be at scale 2^{self.adapter_bits}, not 2^{self.backend.scale_bits(ct):.2f}"
            )
        return ct

    def module(self, name: str) -> _EncryptedModule:
        module = self.modules.get(name)
        if module is None:
            raise UsageError(f"the encrypted adapter has no module {name!r}")
        return module

    def pad(self, name: str) -> Pad:
        """Everything of one token's work that does not depend on its activations: masks, and ``e`` whole.

        ``t`` and ``M`` are independent of ``x``, so ``e = sum_i Enc(B_i) t_i + M`` and
        the encrypted row masks can be made ahead of time; each pad is used once.
        """
        np_ = _numpy()
        module = self.module(name)
        spec, backend, bits = module.spec, self.backend, self.masks
        a_layout, b_layout = spec.a_layout, spec.b_layout
        product_bits = self.adapter_bits + self.token_bits
        # Each (row, chunk) segment sums to its own Gaussian share; a row's t_i is the sum of its shares, so
        # chunk sums of a long row are each hidden (one shared t would reveal their differences).
        shares = gaussian((spec.rank, a_layout.chunks), bits.row)
        t_sums = shares.sum(axis=1)
        row_masks = []
        for k in range(len(module.a)):
            mask = gaussian((a_layout.slots,), bits.slot)
            for row, chunk, offset, length in a_layout.placed(k):
                segment = mask[offset : offset + length]
                segment += shares[row, chunk] / length - segment.mean()
            row_masks.append(self._encrypted_mask(mask, product_bits))
        unmask = np_.zeros(spec.d_out)
        outs = []
        for members in module.groups:
            total = None
            for k in members:
                t_slots = np_.zeros(b_layout.slots)
                for col, _, offset, length in b_layout.placed(k):
                    t_slots[offset : offset + length] = t_sums[col]
                product = backend.multiply_plain(module.b[k], t_slots, scale_bits=self.token_bits)
                total = product if total is None else backend.add(total, product)
                self.plain_products += 1
            mask = gaussian((b_layout.slots,), bits.out)
            for _, chunk, offset, length in b_layout.placed(members[0]):
                start = chunk * b_layout.chunk
                unmask[start : start + length] += mask[offset : offset + length]
            outs.append(backend.serialize_ciphertext(backend.add(total, self._encrypted_mask(mask, product_bits))))
        return Pad(row_masks, outs, unmask)

    def _encrypted_mask(self, real: NDArray[np.float64], scale_bits: int) -> Any:
        """A fresh public-key encryption of ``real`` with Gaussian imaginary parts.

        Fresh encryption re-randomises the sum it is added to: a product ``Enc(A) * x``
        alone would let whoever made ``Enc(A)`` divide ``x`` out of its second component.
        Random imaginary parts fill the half of the coefficient space that real masks
        leave untouched, where the adapter's own encryption noise times ``x`` would show.
        """
        backend = self.backend
        imaginary = gaussian(real.shape, self.masks.slot)
        ct = backend.encrypt(real, scale_bits=scale_bits, imaginary=imaginary)
        while backend.level(ct) > LORA_LEVEL:
            ct = backend.mod_switch(ct)
        return ct

    def pad_to_bytes(self, pad: Pad) -> bytes:
        """A pad as a frame, to cross from a pool worker to the evaluator (both on the evaluator's side)."""
        np_ = _numpy()
        blobs = [self.backend.serialize_ciphertext(m) for m in pad.row_masks] + pad.outs
        blobs.append(np_.ascontiguousarray(pad.unmask, "<f8").tobytes())
        return _frame(PAD, {"rows": len(pad.row_masks), "outs": len(pad.outs)}, blobs)

    def pad_from_bytes(self, name: str, data: bytes) -> Pad:
        module = self.module(name)
        header, blobs = _unframe(PAD, data, "HE-LoRA pad")
        rows, outs = int(header.get("rows", -1)), int(header.get("outs", -1))
        if rows != len(module.a) or outs != len(module.groups) or len(blobs) != rows + outs + 1:
            raise BackendError(f"an HE-LoRA pad for {name!r} has the wrong shape")
        masks = [self.backend.deserialize_ciphertext(b) for b in blobs[:rows]]
        return Pad(masks, blobs[rows : rows + outs], _floats(blobs[-1], module.spec.d_out, "HE-LoRA pad"))


# -- the evaluator -----------------------------------------------------------------------


class Evaluator:
    """Holds the public parameters, the public key and adapter ciphertexts; never the secret key.

    ``pool`` supplies pads made ahead of time (see :mod:`tensafe.he.pool`);
    without one, or while it has none ready, pads made by :meth:`prepare` are
    used, then pads made inline. ``hiding_limit`` caps the session's
    statistical-distance bound (:class:`tensafe.he.hiding.HidingLedger`).
    """

    def __init__(
        self,
        backend: HEBackend,
        adapter: bytes,
        transport: LoraTransport,
        masks: MaskBits | None = None,
        *,
        pool: MaskPool | None = None,
        hiding_limit: float | None = None,
    ):
        self._maker = PadMaker(backend, adapter, masks)
        self._backend = backend
        self._transport = transport
        self.key_id = self._maker.key_id
        self.masks = self._maker.masks
        self.adapter_bits, self.token_bits = self._maker.adapter_bits, self._maker.token_bits
        self.modules = self._maker.modules
        self.pool = pool
        self.hiding = HidingLedger(self.masks, hiding_limit)
        #: Counters for benchmarks: products, rotations (always 0), ciphertexts sent.
        self.stats = {"plain_products": 0, "rotations": 0, "ciphertexts_sent": 0}
        self._pads: dict[str, list[Pad]] = {}

    @property
    def backend(self) -> HEBackend:
        return self._backend

    def prepare(self, name: str, tokens: int) -> None:
        """Precompute pads for ``tokens`` future tokens of module ``name`` (the offline phase, in process)."""
        self._maker.module(name)
        self._pads.setdefault(name, []).extend(self._maker.pad(name) for _ in range(tokens))

    def prefetch(self, name: str, count: int = 1) -> int:
        """Move up to ``count`` finished pads of ``name`` from the pool into the evaluator, decoded.

        Call it while the evaluator would otherwise wait (the base model computing, the key owner
        answering): decoding a pad's ciphertexts then stays off the next token's critical path.
        Returns how many were moved.
        """
        if self.pool is None:
            return 0
        moved = 0
        while moved < count and self.pool.ready(name):
            self._pads.setdefault(name, []).insert(0, self._maker.pad_from_bytes(name, self.pool.take(name)))
            moved += 1
        return moved

    def _take_pad(self, name: str) -> Pad:
        ready = self._pads.get(name)
        if ready:
            return ready.pop()
        if self.pool is not None:
            return self._maker.pad_from_bytes(name, self.pool.take(name))
        return self._maker.pad(name)

    def _room(self, module: _EncryptedModule, x: NDArray[np.float64]) -> None:
        """Refuse activations whose products, by the adapter's declared size, would leave the value room."""
        np_ = _numpy()
        biggest = module.norms.a_max * float(np_.max(np_.abs(x), initial=0.0)) + 16 * 2.0**self.masks.slot
        if biggest >= 2.0 ** (VALUE_ROOM_BITS - 2):
            raise UsageError(
                f"module {module.spec.name!r}: activations up to {float(np_.max(np_.abs(x))):.3g} times the "
                f"adapter's declared largest weight exceed the protocol's value room of 2^{VALUE_ROOM_BITS - 2}"
            )

    def request(self, name: str, x: NDArray[np.float64]) -> tuple[LoraRequest, NDArray[np.float64]]:
        """Masked ciphertexts for activations ``x`` (tokens x d_in), and the unmasking terms ``M'`` to keep."""
        request, unmask = self.request_many({name: x})
        return request, unmask[name]

    def request_many(self, xs: Mapping[str, NDArray[np.float64]]) -> tuple[LoraRequest, dict[str, NDArray[np.float64]]]:
        """One request for several modules' activations; the hiding bound is charged before anything is made."""
        np_ = _numpy()
        checked = {}
        for name, raw in xs.items():
            module = self._maker.module(name)
            x = np_.asarray(raw, dtype=np_.float64)
            if x.ndim != 2 or x.shape[1] != module.spec.d_in or not np_.all(np_.isfinite(x)):
                raise UsageError(
                    f"module {name!r} takes finite activations of width {module.spec.d_in}, got shape {x.shape}"
                )
            self._room(module, x)
            checked[name] = (module, x)
        self.hiding.charge({name: (module.norms, x) for name, (module, x) in checked.items()})
        parts, unmasks = [], {}
        for name, (module, x) in checked.items():
            part, unmasks[name] = self._module_request(module, x)
            parts.append(part)
        return LoraRequest(parts, self.key_id), unmasks

    def _module_request(
        self, module: _EncryptedModule, x: NDArray[np.float64]
    ) -> tuple[ModuleRequest, NDArray[np.float64]]:
        np_ = _numpy()
        spec, backend = module.spec, self._backend
        a_layout = spec.a_layout
        rows_out: list[list[bytes]] = []
        outs_out: list[list[bytes]] = []
        unmask = np_.zeros((x.shape[0], spec.d_out))
        for t in range(x.shape[0]):
            pad = self._take_pad(spec.name)
            cts = []
            spread: dict[tuple[tuple[int, int], ...], Any] = {}
            for k, enc_a in enumerate(module.a):
                key = tuple((chunk, offset) for _, chunk, offset, _ in a_layout.placed(k))
                if key not in spread:  # ciphertexts with the same segments share one encoding of x
                    spread[key] = backend.encode(a_layout.spread(x[t], k), scale_bits=self.token_bits, level=LORA_LEVEL)
                product = backend.multiply_plain(enc_a, spread[key])
                cts.append(backend.serialize_ciphertext(backend.add(product, pad.row_masks[k])))
                self.stats["plain_products"] += 1
            rows_out.append(cts)
            outs_out.append(pad.outs)
            unmask[t] = pad.unmask
            self.stats["ciphertexts_sent"] += len(cts) + len(pad.outs)
        return ModuleRequest(spec.name, x.shape[0], rows_out, outs_out), unmask

    def deltas(self, xs: Mapping[str, NDArray[np.float64]]) -> dict[str, NDArray[np.float64]]:
        """The LoRA deltas ``(alpha / r) * B A x`` of several modules, in one round trip to the key owner.

        Modules whose inputs are ready together (a layer's q, k and v projections
        read the same hidden state) share the round; a later layer's input
        depends on this one's output, so it needs a round of its own.
        """
        request, unmask = self.request_many(xs)
        response = LoraResponse.from_bytes(self._transport.exchange(request.to_bytes()))
        out = {}
        for name, kept in unmask.items():
            values = response.values.get(name)
            if values is None or values.shape != kept.shape:
                shape = None if values is None else values.shape
                raise BackendError(f"the key owner answered {name!r} with shape {shape}, not {kept.shape}")
            out[name] = self.modules[name].spec.scaling * (values + kept)
        return out

    def delta(self, name: str, x: NDArray[np.float64]) -> NDArray[np.float64]:
        """The LoRA delta ``(alpha / r) * B A x`` for each row of ``x``, through one round trip to the key owner."""
        return self.deltas({name: x})[name]


#: The file an HE-encrypted adapter has inside a TGSP package, and the manifest marker's protocol name.
ENCRYPTED_ADAPTER_FILE = "he_adapter.bin"
PROTOCOL = "tensafe-he-lora-2"


def adapter_marker(adapter: bytes, he_backend: str) -> dict[str, Any]:
    """The TGSP manifest's ``encrypted_adapter`` entry for a package carrying ``adapter``."""
    header, _ = _unframe(ADAPTER, adapter, "encrypted HE-LoRA adapter")
    return {
        "protocol": PROTOCOL,
        "he_backend": he_backend,
        "file": ENCRYPTED_ADAPTER_FILE,
        "key_id": header.get("key_id"),
        "modules": [ModuleSpec.from_json(m).name for m in header.get("modules", [])],
    }


def in_process(
    backend_factory: Callable[[], HEBackend], config: HEConfig, modules: Mapping[str, tuple[Any, Any, float]]
) -> tuple[KeyOwner, Evaluator]:
    """A key owner with fresh keys, its adapter encrypted, and an evaluator talking to it in process.

    The two parties get separate backend objects (separate contexts); only bytes pass between them.
    """
    owner = KeyOwner.create(backend_factory(), config)
    adapter = owner.encrypt_adapter(modules)
    evaluator = Evaluator(backend_factory(), adapter, InProcessTransport(owner))
    return owner, evaluator


def open_encrypted(
    backend_factory: Callable[[], HEBackend],
    adapter: bytes,
    key_owner_state: bytes,
    passphrase: str | bytes | None = None,
) -> Evaluator:
    """An evaluator for an encrypted adapter, talking in process to the key owner sealed in ``key_owner_state``.

    The passphrase defaults to the environment variable ``TENSAFE_HE_PASSPHRASE``.
    """
    if passphrase is None:
        passphrase = sealed_state.passphrase_from_env()
    owner = KeyOwner.load(backend_factory(), key_owner_state, passphrase)
    return Evaluator(backend_factory(), adapter, InProcessTransport(owner))
