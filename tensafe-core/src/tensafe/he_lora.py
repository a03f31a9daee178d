"""HE-LoRA: a LoRA product computed on an encrypted adapter, with no rotations.

Two parties, separated by bytes:

* the **key owner** holds the CKKS secret key and the plaintext adapter. It
  encrypts each module's A rows and B columns (:meth:`KeyOwner.encrypt_adapter`)
  and ships them, with the public parameters and public key only, to
* the **evaluator**, which runs the base model in plaintext. For each token
  and adapted module it computes, with plaintext-ciphertext products only,

  - ``c = Enc(A rows) * x + Enc(m)`` where each row's mask ``m_i`` is fresh,
    uniform and sums (over the row's slots) to a fresh random ``t_i``;
  - ``e = sum_i Enc(B column i) * t_i + Enc(M)`` with a fresh uniform mask ``M``,

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
hiding the masks give, and what HE cannot protect here. Everything crosses
between the parties as bytes through a :class:`LoraTransport`; the in-process
transport still serialises every message, so the evaluator's state never
shares an object with the key owner's.
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

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

    from tensafe.config import HEConfig
    from tensafe.interfaces import HEBackend

ADAPTER_MAGIC = b"TSHE-LORA-ADAPTER\x01"
REQUEST_MAGIC = b"TSHE-LORA-REQ\x01"
RESPONSE_MAGIC = b"TSHE-LORA-RSP\x01"
OWNER_MAGIC = b"TSHE-LORA-OWNER\x01"
LENGTH = struct.Struct(">Q")
#: Levels an adapter ciphertext needs: one plaintext product, no rescale (see THREAT_MODEL.md).
LORA_LEVEL = 2
#: Bits between the product's scale and the level's modulus: room for masked values and a margin.
VALUE_ROOM_BITS = 30
MAX_HEADER = 1 << 24
#: log2 of the width of the uniform noise the key owner adds to each value it returns.
FLOOD_BITS = -20


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:  # pragma: no cover - numpy comes with every HE backend
        raise MissingDependencyError("HE-LoRA needs numpy: pip install numpy") from None
    return numpy


@dataclass(frozen=True)
class MaskBits:
    """log2 of the masks' ranges; see THREAT_MODEL.md for the hiding and precision each gives.

    ``slot``: each slot of ``c`` gets a uniform mask in [-2^slot, 2^slot].
    ``row``: each row's sum ``t_i`` is uniform in [-2^row, 2^row].
    ``out``: each slot of ``e`` gets a uniform mask in [-2^out, 2^out].
    Decoding in float64 bounds them: a value of magnitude 2^k decodes with an
    error of about 2^(k - 46), summed over a row's slots.
    """

    slot: int = 20
    row: int = 14
    out: int = 26


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


# -- framing: a JSON header and binary blobs, no pickle ---------------------------------


def _frame(magic: bytes, header: Mapping[str, Any], blobs: Sequence[bytes]) -> bytes:
    head = json.dumps({**header, "blobs": [len(b) for b in blobs]}, sort_keys=True).encode()
    return b"".join([magic, LENGTH.pack(len(head)), head, *blobs])


def _unframe(magic: bytes, data: bytes, what: str) -> tuple[dict[str, Any], list[bytes]]:
    if not isinstance(data, bytes | bytearray) or not bytes(data[: len(magic)]) == magic:
        raise BackendError(f"not a serialised {what}")
    data = bytes(data)
    offset = len(magic)
    try:
        (length,) = LENGTH.unpack_from(data, offset)
        if length > MAX_HEADER:
            raise ValueError("header too long")
        header = json.loads(data[offset + LENGTH.size : offset + LENGTH.size + length])
        sizes = header["blobs"]
        if not isinstance(header, dict) or not all(isinstance(s, int) and s >= 0 for s in sizes):
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
    level :data:`LORA_LEVEL`; the adapter takes the larger share because its
    encryption noise is multiplied by the masks' sums.
    """
    if backend.top_level < LORA_LEVEL:
        raise UsageError(f"HE-LoRA needs at least {LORA_LEVEL} data primes (he.coeff_mod_bit_sizes has too few)")
    bits = backend.modulus_bits(LORA_LEVEL)
    product = bits - VALUE_ROOM_BITS
    if product < 60:
        raise UsageError(
            f"HE-LoRA needs the first two primes to total at least {60 + VALUE_ROOM_BITS} bits, not {bits}"
        )
    adapter = min(product // 2 + 10, bits - 10)
    return adapter, product - adapter


def _random(shape: tuple[int, ...], bits: int) -> NDArray[np.float64]:
    """Uniform reals in [-2^bits, 2^bits] from the operating system's CSPRNG."""
    np_ = _numpy()
    count = int(math.prod(shape))
    raw = np_.frombuffer(os.urandom(8 * count), dtype="<u8")
    unit = (raw >> np_.uint64(11)).astype(np_.float64) * (2.0**-53)  # uniform in [0, 1) with 53 random bits
    return ((unit * 2.0 - 1.0) * 2.0**bits).reshape(shape)  # type: ignore[no-any-return]


# -- messages ----------------------------------------------------------------------------


@dataclass
class LoraRequest:
    """What the evaluator sends for one module and a batch of tokens: masked ciphertexts only."""

    module: str
    tokens: int
    rows: list[list[bytes]]
    outs: list[list[bytes]]
    key_id: str = ""

    def to_bytes(self) -> bytes:
        blobs = [b for token in self.rows for b in token] + [b for token in self.outs for b in token]
        per_row = len(self.rows[0]) if self.rows else 0
        per_out = len(self.outs[0]) if self.outs else 0
        header = {
            "module": self.module,
            "tokens": self.tokens,
            "per_row": per_row,
            "per_out": per_out,
            "key_id": self.key_id,
        }
        return _frame(REQUEST_MAGIC, header, blobs)

    @classmethod
    def from_bytes(cls, data: bytes) -> LoraRequest:
        header, blobs = _unframe(REQUEST_MAGIC, data, "HE-LoRA request")
        try:
            module, tokens = str(header["module"]), int(header["tokens"])
            per_row, per_out = int(header["per_row"]), int(header["per_out"])
            key = str(header["key_id"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BackendError(f"malformed HE-LoRA request: {exc}") from None
        if tokens < 1 or len(blobs) != tokens * (per_row + per_out):
            raise BackendError("malformed HE-LoRA request: ciphertext count does not match")
        rows = [blobs[t * per_row : (t + 1) * per_row] for t in range(tokens)]
        base = tokens * per_row
        outs = [blobs[base + t * per_out : base + (t + 1) * per_out] for t in range(tokens)]
        return cls(module, tokens, rows, outs, key)


@dataclass
class LoraResponse:
    """The key owner's answer: ``y = B A x - M'`` per token, a plaintext that reveals nothing without ``M'``."""

    values: NDArray[np.float64]

    def to_bytes(self) -> bytes:
        np_ = _numpy()
        rows, cols = self.values.shape
        return _frame(RESPONSE_MAGIC, {"shape": [rows, cols]}, [np_.ascontiguousarray(self.values, "<f8").tobytes()])

    @classmethod
    def from_bytes(cls, data: bytes) -> LoraResponse:
        header, blobs = _unframe(RESPONSE_MAGIC, data, "HE-LoRA response")
        try:
            rows, cols = (int(v) for v in header["shape"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BackendError(f"malformed HE-LoRA response: {exc}") from None
        if len(blobs) != 1 or rows < 0 or cols < 0:
            raise BackendError("malformed HE-LoRA response")
        return cls(_floats(blobs[0], rows * cols, "HE-LoRA response").reshape(rows, cols))


class LoraTransport(Protocol):
    """Carries a serialised request to the key owner and its serialised response back."""

    def exchange(self, request: bytes) -> bytes: ...


class InProcessTransport:
    """A transport to a key owner in the same process; messages still travel as bytes."""

    def __init__(self, key_owner: KeyOwner) -> None:
        self._key_owner = key_owner
        #: Bytes sent to and received from the key owner (for benchmarks and audits).
        self.sent = 0
        self.received = 0

    def exchange(self, request: bytes) -> bytes:
        self.sent += len(request)
        response = self._key_owner.handle(request)
        self.received += len(response)
        return response


# -- the key owner -----------------------------------------------------------------------


@dataclass
class _OwnedModule:
    spec: ModuleSpec
    b: NDArray[np.float64]  # (d_out, rank)


class KeyOwner:
    """Holds the secret key and the plaintext adapter; decrypts only masked values."""

    def __init__(self, backend: HEBackend) -> None:
        if not backend.has_key("secret"):
            raise UsageError("the HE-LoRA key owner needs a context with its secret key")
        self._backend = backend
        self._modules: dict[str, _OwnedModule] = {}

    @classmethod
    def create(cls, backend: HEBackend, config: HEConfig) -> KeyOwner:
        """Fresh keys: public and secret only; no relinearisation or Galois keys, the protocol needs neither."""
        backend.create_context(config, rotations=(), relinearization=False)
        lora_scales(backend)  # refuse parameters the protocol cannot run on, before any work
        return cls(backend)

    @property
    def backend(self) -> HEBackend:
        return self._backend

    @property
    def key_id(self) -> str:
        """Names the key pair: requests for adapters encrypted under another key are refused."""
        return key_id(self._backend.serialize_key("public"))

    def encrypt_adapter(self, modules: Mapping[str, tuple[Any, Any, float]]) -> bytes:
        """Encrypt ``{name: (A, B, scaling)}`` (A is r x d_in, B is d_out x r) for an evaluator.

        The result holds the public parameters, the public key and the
        ciphertexts, at the lowest level the protocol needs; never the secret key.
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
            header_modules.append(spec.to_json())
            blobs.extend(cts)
            self._modules[name] = _OwnedModule(spec, b)
        return _frame(ADAPTER_MAGIC, {"modules": header_modules, "key_id": self.key_id}, blobs)

    def _encrypt_at_lora_level(self, slots: NDArray[np.float64], scale_bits: int) -> bytes:
        backend = self._backend
        ct = backend.encrypt(slots, scale_bits=scale_bits)
        while backend.level(ct) > LORA_LEVEL:
            ct = backend.mod_switch(ct)  # fewer primes, fewer bytes, same scale
        return backend.serialize_ciphertext(ct)

    def handle(self, request: bytes) -> bytes:
        """Answer one serialised :class:`LoraRequest` with a serialised :class:`LoraResponse`."""
        return self.respond(LoraRequest.from_bytes(request)).to_bytes()

    def respond(self, request: LoraRequest) -> LoraResponse:
        np_ = _numpy()
        if request.key_id != self.key_id:
            raise BackendError("the request is for an adapter encrypted under another key pair than this key owner's")
        owned = self._modules.get(request.module)
        if owned is None:
            raise BackendError(f"the key owner has no adapter module {request.module!r}")
        spec, backend = owned.spec, self._backend
        a_layout, b_layout = spec.a_layout, spec.b_layout
        groups = _out_groups(b_layout)
        out = np_.empty((request.tokens, spec.d_out))
        for t in range(request.tokens):
            if len(request.rows[t]) != a_layout.ciphertexts or len(request.outs[t]) != len(groups):
                raise BackendError(f"HE-LoRA request for {spec.name!r} has the wrong number of ciphertexts")
            w = np_.zeros(spec.rank)
            for k, blob in enumerate(request.rows[t]):
                slots = backend.decrypt(self._checked(blob))
                for row, _, offset, length in a_layout.placed(k):
                    w[row] += float(np_.sum(slots[offset : offset + length]))
            z = np_.zeros(b_layout.chunks * b_layout.chunk)
            for blob, members in zip(request.outs[t], groups, strict=True):
                slots = backend.decrypt(self._checked(blob))
                for _, chunk, offset, length in b_layout.placed(members[0]):
                    z[chunk * b_layout.chunk : chunk * b_layout.chunk + length] += slots[offset : offset + length]
            # Flooding: fresh noise far above the decryption noise and the decoder's rounding in w and z,
            # so that y says nothing exact about them (decryption results are what key-recovery attacks on
            # CKKS feed on); it is far below the precision the delta needs.
            out[t] = owned.b @ w - z[: spec.d_out] + _random((spec.d_out,), FLOOD_BITS)
        return LoraResponse(out)

    def _checked(self, blob: bytes) -> Any:
        backend = self._backend
        ct = backend.deserialize_ciphertext(blob)
        if backend.level(ct) != LORA_LEVEL:
            raise BackendError(f"HE-LoRA ciphertexts must be at level {LORA_LEVEL}, not {backend.level(ct)}")
        return ct

    # -- persistence: the key owner's own secret state ---------------------------------

    def save(self) -> bytes:
        """The key owner's state (secret key and plaintext B matrices): keep it secret."""
        np_ = _numpy()
        backend = self._backend
        blobs = [backend.serialize_context(), backend.serialize_key("secret"), backend.serialize_key("public")]
        specs = []
        for name in sorted(self._modules):
            owned = self._modules[name]
            specs.append(owned.spec.to_json())
            blobs.append(np_.ascontiguousarray(owned.b, "<f8").tobytes())
        return _frame(OWNER_MAGIC, {"modules": specs}, blobs)

    @classmethod
    def load(cls, backend: HEBackend, data: bytes) -> KeyOwner:
        header, blobs = _unframe(OWNER_MAGIC, data, "HE-LoRA key owner state")
        specs = [ModuleSpec.from_json(m) for m in header.get("modules", [])]
        if len(blobs) != 3 + len(specs):
            raise BackendError("malformed HE-LoRA key owner state")
        backend.load_context(blobs[0])
        backend.load_key("secret", blobs[1])
        backend.load_key("public", blobs[2])
        owner = cls(backend)
        for spec, blob in zip(specs, blobs[3:], strict=True):
            owner._modules[spec.name] = _OwnedModule(
                spec, _floats(blob, spec.d_out * spec.rank, spec.name).reshape(spec.d_out, spec.rank)
            )
        return owner


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


# -- the evaluator -----------------------------------------------------------------------


@dataclass
class _Pad:
    """One token's precomputed masks for one module (used once)."""

    row_masks: list[Any]
    outs: list[bytes]
    unmask: NDArray[np.float64]


@dataclass
class _EncryptedModule:
    spec: ModuleSpec
    a: list[Any]
    b: list[Any]
    groups: list[list[int]] = field(default_factory=list)


class Evaluator:
    """Holds the public parameters, the public key and adapter ciphertexts; never the secret key."""

    def __init__(self, backend: HEBackend, adapter: bytes, transport: LoraTransport, masks: MaskBits | None = None):
        header, blobs = _unframe(ADAPTER_MAGIC, adapter, "encrypted HE-LoRA adapter")
        backend.load_context(blobs[0])
        backend.load_key("public", blobs[1])
        if backend.has_key("secret"):
            raise UsageError("an HE-LoRA evaluator must not hold a secret key")
        self._backend = backend
        self._transport = transport
        self.key_id = str(header.get("key_id", ""))
        if self.key_id != key_id(blobs[1]):
            raise BackendError("the encrypted adapter's key id does not match its public key")
        self.masks = masks or MaskBits()
        self.adapter_bits, self.token_bits = lora_scales(backend)
        self.modules: dict[str, _EncryptedModule] = {}
        offset = 2
        for raw in header.get("modules", []):
            spec = ModuleSpec.from_json(raw)
            if spec.slots != backend.slot_count:
                raise BackendError(f"module {spec.name!r} was packed for {spec.slots} slots, not {backend.slot_count}")
            n_a, n_b = spec.a_layout.ciphertexts, spec.b_layout.ciphertexts
            if offset + n_a + n_b > len(blobs):
                raise BackendError("malformed encrypted HE-LoRA adapter: too few ciphertexts")
            cts = [self._adapter_ct(b) for b in blobs[offset : offset + n_a + n_b]]
            offset += n_a + n_b
            self.modules[spec.name] = _EncryptedModule(spec, cts[:n_a], cts[n_a:], _out_groups(spec.b_layout))
        if offset != len(blobs):
            raise BackendError("malformed encrypted HE-LoRA adapter: trailing ciphertexts")
        #: Counters for benchmarks: products, rotations (always 0), ciphertexts sent.
        self.stats = {"plain_products": 0, "rotations": 0, "ciphertexts_sent": 0}
        self._pads: dict[str, list[_Pad]] = {}

    @property
    def backend(self) -> HEBackend:
        return self._backend

    def _adapter_ct(self, blob: bytes) -> Any:
        ct = self._backend.deserialize_ciphertext(blob)
        if self._backend.level(ct) != LORA_LEVEL:
            raise BackendError(f"adapter ciphertexts must be at level {LORA_LEVEL}")
        return ct

    def _module(self, name: str) -> _EncryptedModule:
        module = self.modules.get(name)
        if module is None:
            raise UsageError(f"the encrypted adapter has no module {name!r}")
        return module

    def _pad(self, module: _EncryptedModule) -> _Pad:
        """Everything of one token's work that does not depend on its activations: masks, and ``e`` whole.

        ``t`` and ``M`` are independent of ``x``, so ``e = sum_i Enc(B_i) t_i + M`` and
        the encoded row masks can be made ahead of time (:meth:`prepare`); each pad is used once.
        """
        np_ = _numpy()
        spec, backend, bits = module.spec, self._backend, self.masks
        a_layout, b_layout = spec.a_layout, spec.b_layout
        product_bits = self.adapter_bits + self.token_bits
        t_sums = _random((spec.rank,), bits.row)
        row_masks = []
        for k in range(len(module.a)):
            placed = a_layout.placed(k)
            mask = _random((a_layout.slots,), bits.slot)
            for row, _, offset, length in placed:
                segment = mask[offset : offset + length]
                segment += t_sums[row] / a_layout.chunks / length - segment.mean()
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
                self.stats["plain_products"] += 1
            mask = _random((b_layout.slots,), bits.out)
            for _, chunk, offset, length in b_layout.placed(members[0]):
                start = chunk * b_layout.chunk
                unmask[start : start + length] += mask[offset : offset + length]
            outs.append(backend.serialize_ciphertext(backend.add(total, self._encrypted_mask(mask, product_bits))))
        return _Pad(row_masks, outs, unmask)

    def _encrypted_mask(self, real: NDArray[np.float64], scale_bits: int) -> Any:
        """A fresh public-key encryption of ``real`` with uniformly random imaginary parts.

        Fresh encryption re-randomises the sum it is added to: a product ``Enc(A) * x``
        alone would let whoever made ``Enc(A)`` divide ``x`` out of its second component.
        Random imaginary parts fill the half of the coefficient space that real masks
        leave untouched, where the adapter's own encryption noise times ``x`` would show.
        """
        backend = self._backend
        imaginary = _random(real.shape, self.masks.slot)
        ct = backend.encrypt(real, scale_bits=scale_bits, imaginary=imaginary)
        while backend.level(ct) > LORA_LEVEL:
            ct = backend.mod_switch(ct)
        return ct

    def prepare(self, name: str, tokens: int) -> None:
        """Precompute pads for ``tokens`` future tokens of module ``name`` (the offline phase)."""
        module = self._module(name)
        self._pads.setdefault(name, []).extend(self._pad(module) for _ in range(tokens))

    def request(self, name: str, x: NDArray[np.float64]) -> tuple[LoraRequest, NDArray[np.float64]]:
        """Masked ciphertexts for activations ``x`` (tokens x d_in), and the unmasking terms ``M'`` to keep."""
        np_ = _numpy()
        module = self._module(name)
        spec, backend = module.spec, self._backend
        x = np_.asarray(x, dtype=np_.float64)
        if x.ndim != 2 or x.shape[1] != spec.d_in or not np_.all(np_.isfinite(x)):
            raise UsageError(f"module {name!r} takes finite activations of width {spec.d_in}, got shape {x.shape}")
        a_layout = spec.a_layout
        pads = self._pads.get(name, [])
        rows_out: list[list[bytes]] = []
        outs_out: list[list[bytes]] = []
        unmask = np_.zeros((x.shape[0], spec.d_out))
        for t in range(x.shape[0]):
            pad = pads.pop() if pads else self._pad(module)
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
        return LoraRequest(name, x.shape[0], rows_out, outs_out, self.key_id), unmask

    def delta(self, name: str, x: NDArray[np.float64]) -> NDArray[np.float64]:
        """The LoRA delta ``(alpha / r) * B A x`` for each row of ``x``, through one round trip to the key owner."""
        request, unmask = self.request(name, x)
        response = LoraResponse.from_bytes(self._transport.exchange(request.to_bytes()))
        if response.values.shape != unmask.shape:
            raise BackendError(f"the key owner answered with shape {response.values.shape}, not {unmask.shape}")
        return self.modules[name].spec.scaling * (response.values + unmask)


#: The file an HE-encrypted adapter has inside a TGSP package, and the manifest marker's protocol name.
ENCRYPTED_ADAPTER_FILE = "he_adapter.bin"
PROTOCOL = "tensafe-he-lora-1"


def adapter_marker(adapter: bytes, he_backend: str) -> dict[str, Any]:
    """The TGSP manifest's ``encrypted_adapter`` entry for a package carrying ``adapter``."""
    header, _ = _unframe(ADAPTER_MAGIC, adapter, "encrypted HE-LoRA adapter")
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


def open_encrypted(backend_factory: Callable[[], HEBackend], adapter: bytes, key_owner_state: bytes) -> Evaluator:
    """An evaluator for an encrypted adapter, talking in process to the key owner saved in ``key_owner_state``."""
    owner = KeyOwner.load(backend_factory(), key_owner_state)
    return Evaluator(backend_factory(), adapter, InProcessTransport(owner))
