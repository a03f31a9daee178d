"""The ``seal-ckks`` HE backend: Microsoft SEAL's CKKS scheme through Pyfhel.

Every ciphertext here is a real SEAL CKKS ciphertext. Bytes that cross a
boundary are wrapped in an envelope (magic, kind, the context's id and a
SHA-256 of the SEAL bytes) and their SEAL header and shape are checked against
this context before SEAL parses them, so corrupted or mismatched bytes become
a :class:`tensafe.errors.TensafeError`, never a crash. Pyfhel itself
dereferences missing keys (decrypting without a secret key ends the
interpreter), so every operation checks the keys it needs first.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from numpy.typing import NDArray
from Pyfhel import PyCtxt, Pyfhel, PyPtxt

from tensafe.config import HEConfig
from tensafe.errors import BackendError, ConfigError, UsageError
from tensafe.interfaces import HEBackend, KeyKind, RealVector
from tensafe_he_seal.params import CKKSParameters, validate

ENVELOPE_MAGIC = b"TSHE\x00\x01"
ENVELOPE = struct.Struct(">6sc16s32sQ")
KIND_TAGS: dict[str, bytes] = {
    "context": b"X",
    "ciphertext": b"C",
    "public": b"P",
    "secret": b"S",
    "relinearization": b"R",
    "galois": b"G",
}
#: SEAL's serialisation header: magic, header size, version, compression mode, total size.
SEAL_HEADER = struct.Struct("<HBBBBHQ")
SEAL_MAGIC = 0xA15E
#: A SEAL ciphertext after its header: parms_id, NTT flag, polynomials, N, primes, scale, correction factor.
SEAL_CIPHERTEXT = struct.Struct("<32sBQQQdQ")
#: Bytes around a ciphertext's coefficients: header, metadata, the coefficient array's own header.
CIPHERTEXT_OVERHEAD = SEAL_HEADER.size + SEAL_CIPHERTEXT.size + 24


class HEBytesError(BackendError):
    """Bytes that are not a valid serialised object for this context."""

    code = "he_invalid_bytes"


class HEKeyError(UsageError):
    """An operation needs a key this context does not hold."""

    code = "he_missing_key"


class HEMismatchError(UsageError):
    """Operands from different contexts, levels or scales, or values that do not fit."""

    code = "he_mismatch"


@dataclass
class SealCiphertext:
    """A SEAL ciphertext with the level (data primes left) and context it belongs to."""

    ctxt: Any
    level: int
    context_id: bytes

    @property
    def scale(self) -> float:
        return float(self.ctxt.scale)


@dataclass
class SealPlaintext:
    """An encoded SEAL plaintext with its level, scale and context."""

    ptxt: Any
    level: int
    scale: float
    context_id: bytes


class SealCKKSBackend(HEBackend):
    """CKKS over SEAL: keys, encryption, arithmetic, rotations and checked serialisation."""

    capabilities: ClassVar[frozenset[str]] = frozenset()

    def __init__(self) -> None:
        self._he: Any = None
        self._params: CKKSParameters | None = None
        self._id = b""
        self._primes: list[int] = []
        self._galois_steps: frozenset[int] = frozenset()
        self._parms_ids: dict[int, bytes] = {}

    # -- context and keys ---------------------------------------------------------

    def _make(self, params: CKKSParameters) -> None:
        he = Pyfhel()
        with warnings.catch_warnings():
            # Pyfhel warns when the default scale matches no rescaling chain; scales are chosen per operation.
            warnings.simplefilter("ignore")
            status = he.contextGen(
                scheme="ckks",
                n=params.poly_modulus_degree,
                scale=2.0**params.scale_bits,
                qi_sizes=list(params.coeff_mod_bit_sizes),
                sec=128,
            )
        if not str(status).startswith("success"):
            raise ConfigError(f"SEAL rejected the CKKS parameters {params.to_json()}: {status}")
        self._he = he
        self._params = params
        self._primes = [int(q) for q in he.get_qi()]
        self._id = hashlib.sha256(params.encode() + json.dumps(self._primes).encode()).digest()[:16]
        self._galois_steps = frozenset()
        self._parms_ids = {}

    def create_context(self, config: HEConfig, *, rotations: Sequence[int] = (), relinearization: bool = True) -> None:
        params = validate(config.poly_modulus_degree, list(config.coeff_mod_bit_sizes), config.scale_bits)
        self._make(params)
        self._he.keyGen()
        if relinearization:
            self._he.relinKeyGen()
        steps = sorted({self._normal_step(s) for s in rotations} - {0})
        if steps:
            self._he.rotateKeyGen(steps)
            self._galois_steps = frozenset(steps)

    def _normal_step(self, steps: int) -> int:
        if not isinstance(steps, int):
            raise UsageError(f"a rotation step must be an integer, not {steps!r}")
        return steps % self.slot_count

    def _require_context(self) -> Any:
        if self._he is None:
            raise UsageError("no HE context: call create_context or load_context first")
        return self._he

    @property
    def params(self) -> CKKSParameters:
        self._require_context()
        assert self._params is not None
        return self._params

    @property
    def context_id(self) -> bytes:
        """16 bytes that identify the parameters (and primes) of this context."""
        self._require_context()
        return self._id

    def serialize_context(self) -> bytes:
        self._require_context()
        body = json.dumps({**self.params.to_json(), "primes": self._primes}, sort_keys=True).encode()
        return self._wrap("context", body)

    def load_context(self, data: bytes) -> None:
        context_id, body = _unwrap(data, "context")
        try:
            fields = json.loads(body)
            if not isinstance(fields, dict) or fields.get("scheme") != "ckks":
                raise ValueError("not a CKKS context")
            primes = fields["primes"]
            params = validate(fields["poly_modulus_degree"], fields["coeff_mod_bit_sizes"], fields["scale_bits"])
        except (ValueError, KeyError, TypeError) as exc:
            raise HEBytesError(f"not a serialised CKKS context: {exc}") from None
        self._make(params)
        if primes != self._primes or context_id != self._id:
            raise HEBytesError("the serialised context's primes differ from the ones its parameters give")

    def has_key(self, kind: KeyKind) -> bool:
        if self._he is None:
            return False
        if kind == "public":
            return not self._he.is_public_key_empty()
        if kind == "secret":
            return not self._he.is_secret_key_empty()
        if kind == "relinearization":
            return not self._he.is_relin_key_empty()
        if kind == "galois":
            return bool(self._galois_steps) and not self._he.is_rotate_key_empty()
        raise UsageError(f"unknown key kind {kind!r}")

    def _need(self, kind: KeyKind, what: str) -> Any:
        he = self._require_context()
        if not self.has_key(kind):
            raise HEKeyError(f"{what} needs the {kind} key, which this HE context does not hold")
        return he

    def serialize_key(self, kind: KeyKind) -> bytes:
        he = self._need(kind, f"serialising the {kind} key")
        if kind == "public":
            payload = he.to_bytes_public_key("none")
        elif kind == "secret":
            payload = he.to_bytes_secret_key("none")
        elif kind == "relinearization":
            payload = he.to_bytes_relin_key("none")
        else:
            steps = json.dumps(sorted(self._galois_steps)).encode()
            payload = struct.pack(">I", len(steps)) + steps + he.to_bytes_rotate_key("none")
        return self._wrap(kind, bytes(payload))

    def load_key(self, kind: KeyKind, data: bytes) -> None:
        he = self._require_context()
        if kind not in ("public", "secret", "relinearization", "galois"):
            raise UsageError(f"unknown key kind {kind!r}")
        context_id, payload = _unwrap(data, kind)
        self._check_context(context_id, f"the {kind} key")
        n, primes = self.params.poly_modulus_degree, len(self._primes)
        steps: list[int] = []
        if kind == "galois":
            try:
                (length,) = struct.unpack_from(">I", payload)
                steps = json.loads(payload[4 : 4 + length])
                if not isinstance(steps, list) or not all(isinstance(s, int) and 0 < s < n // 2 for s in steps):
                    raise ValueError("bad steps")
            except (struct.error, ValueError) as exc:
                raise HEBytesError(f"the galois key's step list is malformed: {exc}") from None
            payload = payload[4 + length :]
        _check_seal_header(payload, f"the {kind} key")
        if kind == "public":
            _check_ciphertext_shape(payload, n, primes, primes, "the public key")
        elif kind == "secret" and len(payload) != 88 + 8 * n * primes:
            raise HEBytesError("the secret key has the wrong size for this context")
        loaders = {
            "public": he.from_bytes_public_key,
            "secret": he.from_bytes_secret_key,
            "relinearization": he.from_bytes_relin_key,
            "galois": he.from_bytes_rotate_key,
        }
        try:
            loaders[kind](bytes(payload))
        except (RuntimeError, ValueError, TypeError) as exc:
            raise HEBytesError(f"SEAL rejected the {kind} key: {exc}") from None
        if kind == "galois":
            self._galois_steps = frozenset(steps)

    # -- shape ----------------------------------------------------------------------

    @property
    def slot_count(self) -> int:
        return int(self._require_context().get_nSlots())

    @property
    def top_level(self) -> int:
        return self.params.data_levels

    def level(self, ciphertext: Any) -> int:
        return self._own(ciphertext).level

    def scale_bits(self, ciphertext: Any) -> float:
        return math.log2(self._own(ciphertext).scale)

    def modulus_bits(self, level: int) -> int:
        """Bits of the coefficient modulus a ciphertext at ``level`` has."""
        return sum(self.params.coeff_mod_bit_sizes[:level])

    def _own(self, ciphertext: Any) -> SealCiphertext:
        self._require_context()
        if not isinstance(ciphertext, SealCiphertext):
            raise UsageError(f"expected a seal-ckks ciphertext, got {type(ciphertext).__name__}")
        self._check_context(ciphertext.context_id, "the ciphertext")
        return ciphertext

    def _check_context(self, context_id: bytes, what: str) -> None:
        if context_id != self._id:
            raise HEMismatchError(f"{what} belongs to another HE context (other parameters or keys)")

    # -- encoding -------------------------------------------------------------------

    def _vector(self, values: RealVector) -> NDArray[np.float64]:
        try:
            array = np.ascontiguousarray(values, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"HE values must be a vector of reals: {exc}") from None
        if array.ndim != 1:
            raise UsageError(f"HE values must be one-dimensional, not of shape {array.shape}")
        if array.size > self.slot_count:
            raise UsageError(f"a vector of {array.size} values does not fit in {self.slot_count} slots")
        if not np.all(np.isfinite(array)):
            raise UsageError("HE values must be finite")
        return array

    def _fits(self, biggest: float, scale: float, level: int) -> None:
        bits = self.modulus_bits(level)
        if biggest * scale * 4 >= 2.0**bits or scale * 4 >= 2.0**bits:
            raise HEMismatchError(
                f"values up to {biggest:.3g} at scale 2^{math.log2(scale):.1f} do not fit the {bits}-bit modulus "
                f"of level {level}"
            )

    def _encode(self, array: NDArray[np.float64], scale: float, level: int) -> Any:
        he = self._require_context()
        self._fits(float(np.max(np.abs(array))) if array.size else 0.0, scale, level)
        plain: PyPtxt = he.encodeFrac(array, scale=scale)
        for _ in range(self.top_level - level):
            he.mod_switch_to_next_ptxt(plain, in_new_ptxt=False)
        return plain

    def _scale(self, scale_bits: float | None) -> float:
        bits = self.params.scale_bits if scale_bits is None else scale_bits
        if not isinstance(bits, int | float) or not 1 <= bits <= 120:
            raise UsageError(f"scale_bits must be a number in 1..120, not {bits!r}")
        return float(2.0**bits)

    def encode(self, values: RealVector, *, scale_bits: float | None = None, level: int | None = None) -> SealPlaintext:
        level = self.top_level if level is None else level
        if not isinstance(level, int) or not 1 <= level <= self.top_level:
            raise UsageError(f"level must be 1..{self.top_level}, not {level!r}")
        scale = self._scale(scale_bits)
        return SealPlaintext(self._encode(self._vector(values), scale, level), level, scale, self._id)

    def _plain(self, values: RealVector | SealPlaintext, scale: float, level: int, what: str) -> Any:
        """A SEAL plaintext at ``level`` and ``scale``, encoding ``values`` unless already encoded."""
        if not isinstance(values, SealPlaintext):
            return self._encode(self._vector(values), scale, level)
        self._check_context(values.context_id, "the plaintext")
        if values.level != level or not math.isclose(values.scale, scale, rel_tol=1e-9):
            raise HEMismatchError(
                f"{what}: the plaintext is at level {values.level}, scale 2^{math.log2(values.scale):.2f}; "
                f"the operation needs level {level}, scale 2^{math.log2(scale):.2f}"
            )
        return values.ptxt

    def encrypt(
        self, values: RealVector, *, scale_bits: int | None = None, imaginary: RealVector | None = None
    ) -> SealCiphertext:
        he = self._need("public", "encryption")
        scale = self._scale(scale_bits)
        real = self._vector(values)
        if imaginary is None:
            plain = self._encode(real, scale, self.top_level)
        else:
            imag = self._vector(imaginary)
            if imag.size != real.size:
                raise UsageError(f"{real.size} real parts but {imag.size} imaginary parts")
            self._fits(float(np.max(np.abs(real) + np.abs(imag), initial=0.0)), scale, self.top_level)
            plain = he.encodeComplex(np.ascontiguousarray(real + 1j * imag), scale=scale)
        return SealCiphertext(he.encryptPtxt(plain), self.top_level, self._id)

    def decrypt(self, ciphertext: Any) -> NDArray[np.float64]:
        he = self._need("secret", "decryption")
        self._need("public", "decryption (Pyfhel's decryptor is built with the public key)")
        ct = self._own(ciphertext)
        return np.asarray(he.decryptFrac(ct.ctxt), dtype=np.float64)

    # -- arithmetic -----------------------------------------------------------------

    def _pair(self, a: Any, b: Any, what: str) -> tuple[SealCiphertext, SealCiphertext]:
        x, y = self._own(a), self._own(b)
        if x.level != y.level:
            raise HEMismatchError(f"{what}: operands are at levels {x.level} and {y.level}; mod_switch one first")
        if not math.isclose(x.scale, y.scale, rel_tol=1e-9):
            raise HEMismatchError(
                f"{what}: operands have scales 2^{math.log2(x.scale):.2f} and 2^{math.log2(y.scale):.2f}"
            )
        return x, y

    def _new(self, ctxt: Any, level: int) -> SealCiphertext:
        return SealCiphertext(ctxt, level, self._id)

    def add(self, a: Any, b: Any) -> SealCiphertext:
        x, y = self._pair(a, b, "add")
        return self._new(self._he.add(x.ctxt, y.ctxt, in_new_ctxt=True), x.level)

    def subtract(self, a: Any, b: Any) -> SealCiphertext:
        x, y = self._pair(a, b, "subtract")
        return self._new(self._he.sub(x.ctxt, y.ctxt, in_new_ctxt=True), x.level)

    def add_plain(self, ciphertext: Any, values: RealVector | SealPlaintext) -> SealCiphertext:
        ct = self._own(ciphertext)
        plain = self._plain(values, ct.scale, ct.level, "add_plain")
        return self._new(self._he.add_plain(ct.ctxt, plain, in_new_ctxt=True), ct.level)

    def multiply_plain(
        self, ciphertext: Any, values: RealVector | SealPlaintext, *, scale_bits: int | None = None
    ) -> SealCiphertext:
        ct = self._own(ciphertext)
        scale = values.scale if isinstance(values, SealPlaintext) and scale_bits is None else self._scale(scale_bits)
        self._check_room(ct, ct.scale * scale, "multiply_plain")
        plain = self._plain(values, scale, ct.level, "multiply_plain")
        return self._new(self._he.multiply_plain(ct.ctxt, plain, in_new_ctxt=True), ct.level)

    def multiply(self, a: Any, b: Any) -> SealCiphertext:
        he = self._need("relinearization", "ciphertext multiplication")
        x, y = self._own(a), self._own(b)
        if x.level != y.level:
            raise HEMismatchError(f"multiply: operands are at levels {x.level} and {y.level}; mod_switch one first")
        self._check_room(x, x.scale * y.scale, "multiply")
        product = he.multiply(x.ctxt, y.ctxt, in_new_ctxt=True)
        he.relinearize(product)
        return self._new(product, x.level)

    def _check_room(self, ct: SealCiphertext, scale: float, what: str) -> None:
        bits = self.modulus_bits(ct.level)
        if math.log2(scale) + 2 >= bits:
            raise HEMismatchError(
                f"{what}: the product's scale 2^{math.log2(scale):.1f} exhausts the {bits}-bit modulus left at "
                f"level {ct.level}; rescale first or use more or larger primes"
            )

    def _down(self, ciphertext: Any, what: str) -> SealCiphertext:
        ct = self._own(ciphertext)
        if ct.level <= 1:
            raise HEMismatchError(f"{what}: the ciphertext is at the last modulus level; no prime is left to drop")
        return ct

    def rescale(self, ciphertext: Any) -> SealCiphertext:
        ct = self._down(ciphertext, "rescale")
        last = self._primes[ct.level - 1]
        if ct.scale / last < 2.0:
            raise HEMismatchError(
                f"rescale: the scale 2^{math.log2(ct.scale):.1f} is not above the {last.bit_length()}-bit prime it "
                "would divide by"
            )
        out = PyCtxt(copy_ctxt=ct.ctxt)
        self._he.rescale_to_next(out)
        return self._new(out, ct.level - 1)

    def mod_switch(self, ciphertext: Any) -> SealCiphertext:
        ct = self._down(ciphertext, "mod_switch")
        if math.log2(ct.scale) + 2 >= self.modulus_bits(ct.level - 1):
            raise HEMismatchError(
                f"mod_switch: the scale 2^{math.log2(ct.scale):.1f} does not fit the {self.modulus_bits(ct.level - 1)}"
                "-bit modulus one level down; rescale instead"
            )
        return self._new(self._he.mod_switch_to_next_ctxt(ct.ctxt, in_new_ctxt=True), ct.level - 1)

    def rotate(self, ciphertext: Any, steps: int) -> SealCiphertext:
        ct = self._own(ciphertext)
        step = self._normal_step(steps)
        if step == 0:
            return self._new(PyCtxt(copy_ctxt=ct.ctxt), ct.level)
        if step not in self._galois_steps:
            raise HEKeyError(
                f"rotating by {steps} needs a Galois key for that step; this context has keys for "
                f"{sorted(self._galois_steps) or 'no steps'}"
            )
        # result[i] = values[(i + steps) % slot_count]
        return self._new(self._he.rotate(ct.ctxt, step, in_new_ctxt=True), ct.level)

    def sum_slots(self, ciphertext: Any) -> SealCiphertext:
        acc = self._own(ciphertext)
        step = 1
        while step < self.slot_count:
            acc = self.add(acc, self.rotate(acc, step))
            step *= 2
        return acc

    # -- bytes ----------------------------------------------------------------------

    def _wrap(self, kind: str, payload: bytes) -> bytes:
        digest = hashlib.sha256(payload).digest()
        return ENVELOPE.pack(ENVELOPE_MAGIC, KIND_TAGS[kind], self._id, digest, len(payload)) + payload

    def serialize_ciphertext(self, ciphertext: Any) -> bytes:
        ct = self._own(ciphertext)
        return self._wrap("ciphertext", bytes(ct.ctxt.to_bytes("none")))

    def _parms_id(self, level: int) -> bytes | None:
        """SEAL's id of the parameters at ``level`` (needs the public key to make a reference ciphertext)."""
        if not self._parms_ids and self.has_key("public"):
            ct = self.encrypt([0.0])
            for lvl in range(self.top_level, 0, -1):
                self._parms_ids[lvl] = bytes(ct.ctxt.to_bytes("none")[16:48])
                if lvl > 1:
                    ct = self._new(self._he.mod_switch_to_next_ctxt(ct.ctxt, in_new_ctxt=True), lvl - 1)
        return self._parms_ids.get(level)

    def deserialize_ciphertext(self, data: bytes) -> SealCiphertext:
        he = self._require_context()
        context_id, payload = _unwrap(data, "ciphertext")
        self._check_context(context_id, "the ciphertext")
        n = self.params.poly_modulus_degree
        level = _check_ciphertext_shape(payload, n, 1, self.top_level, "the ciphertext")
        expected = self._parms_id(level)
        if expected is not None and payload[16:48] != expected:
            raise HEBytesError("the ciphertext's SEAL parameters id does not match this context at its level")
        (scale,) = struct.unpack_from("<d", payload, SEAL_HEADER.size + 57)
        if not math.isfinite(scale) or scale < 1.0 or math.log2(scale) + 1 >= self.modulus_bits(level):
            raise HEBytesError("the ciphertext's scale does not fit its modulus")
        ctxt = PyCtxt(pyfhel=he)
        try:
            ctxt.from_bytes(bytes(payload), "float")
        except (RuntimeError, ValueError, TypeError) as exc:
            raise HEBytesError(f"SEAL rejected the ciphertext: {exc}") from None
        return self._new(ctxt, level)


def _unwrap(data: bytes, kind: str) -> tuple[bytes, bytes]:
    """``(context id, payload)`` of an envelope of ``kind``, whose digest must match."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise UsageError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < ENVELOPE.size or not data.startswith(ENVELOPE_MAGIC):
        raise HEBytesError(f"not a seal-ckks {kind}: the envelope is missing")
    _, tag, context_id, digest, length = ENVELOPE.unpack_from(data)
    if tag != KIND_TAGS[kind]:
        found = next((k for k, t in KIND_TAGS.items() if t == tag), "unknown")
        raise HEBytesError(f"expected a serialised {kind}, got a {found}")
    payload = data[ENVELOPE.size :]
    if len(payload) != length:
        raise HEBytesError(f"the serialised {kind} is truncated or has trailing bytes")
    if hashlib.sha256(payload).digest() != digest:
        raise HEBytesError(f"the serialised {kind} is corrupted (SHA-256 mismatch)")
    return context_id, payload


def _check_seal_header(payload: bytes, what: str) -> None:
    if len(payload) < SEAL_HEADER.size:
        raise HEBytesError(f"{what} is too short to be a SEAL object")
    magic, header_size, major, _minor, compression, _reserved, size = SEAL_HEADER.unpack_from(payload)
    if magic != SEAL_MAGIC or header_size != SEAL_HEADER.size or major != 4:
        raise HEBytesError(f"{what} does not carry a SEAL 4 header")
    if compression != 0:
        raise HEBytesError(f"{what} is compressed; this build of SEAL reads uncompressed objects only")
    if size != len(payload):
        raise HEBytesError(f"{what}: its SEAL header gives {size} bytes, but {len(payload)} are present")


def _check_ciphertext_shape(payload: bytes, n: int, lowest: int, highest: int, what: str) -> int:
    """Check a SEAL ciphertext's metadata before SEAL reads it; returns its number of primes."""
    _check_seal_header(payload, what)
    if len(payload) < CIPHERTEXT_OVERHEAD:
        raise HEBytesError(f"{what} is too short")
    _, ntt, polys, degree, primes, _scale, _factor = SEAL_CIPHERTEXT.unpack_from(payload, SEAL_HEADER.size)
    if ntt != 1 or polys != 2 or degree != n:
        raise HEBytesError(f"{what} is not a two-polynomial CKKS ciphertext of degree {n}")
    if not lowest <= primes <= highest:
        raise HEBytesError(f"{what} claims {primes} primes; this context allows {lowest} to {highest}")
    if len(payload) != CIPHERTEXT_OVERHEAD + 8 * polys * degree * primes:
        raise HEBytesError(f"{what} has {len(payload)} bytes, not the size its metadata implies")
    return int(primes)
