"""The HE-LoRA key owner: holds the secret key and plaintext B, decrypts only masked values."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tensafe.errors import BackendError, UsageError
from tensafe.he import state as sealed_state
from tensafe.he._numpy import numpy_module as _numpy
from tensafe.he.frames import ADAPTER, FRAME_VERSION, OWNER, frame_magic, key_id, pack_frame, read_floats, read_frame
from tensafe.he.hiding import AdapterNorms
from tensafe.he.messages import LoraRequest, LoraResponse, ModuleRequest
from tensafe.he.packing import LORA_LEVEL, ModuleSpec, lora_scales, out_groups

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

    from tensafe.config import HEConfig
    from tensafe.interfaces import HEBackend

#: log2 of the width of the uniform noise the key owner adds to each value it returns; at least 2^4 times
#: the decoder's float64 rounding on y with the default masks (a test measures it).
FLOOD_BITS = -19
#: Ciphertexts a key pair decrypts before the key owner refuses and asks for a rotation (THREAT_MODEL.md).
DECRYPTION_LIMIT = 1 << 20


class KeyRotationRequired(UsageError):
    """The key owner has decrypted :data:`DECRYPTION_LIMIT` ciphertexts under its key pair."""

    code = "he_key_rotation"


def _uniform(shape: tuple[int, ...], bits: int) -> NDArray[np.float64]:
    """Uniform reals in [-2^bits, 2^bits] from the operating system's CSPRNG."""
    np_ = _numpy()
    count = int(math.prod(shape))
    raw = np_.frombuffer(os.urandom(8 * count), dtype="<u8")
    unit = (raw >> np_.uint64(11)).astype(np_.float64) * (2.0**-53)  # uniform in [0, 1) with 53 random bits
    return ((unit * 2.0 - 1.0) * 2.0**bits).reshape(shape)  # type: ignore[no-any-return]


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
        return self._release(pack_frame(ADAPTER, {"modules": header_modules, "key_id": self.key_id}, blobs))

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
        header, blobs = read_frame(ADAPTER, adapter, "encrypted HE-LoRA adapter")
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
            expected = (owned.spec.a_layout.ciphertexts, len(out_groups(owned.spec.b_layout)))
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
        groups = out_groups(b_layout)
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
        return sealed_state.seal(pack_frame(OWNER, header, blobs), passphrase)

    @classmethod
    def load(cls, backend: HEBackend, data: bytes, passphrase: str | bytes | None) -> KeyOwner:
        """A key owner from a sealed state; a clear error for a wrong passphrase or an unencrypted state."""
        header, blobs = read_frame(OWNER, sealed_state.unseal(data, passphrase), "HE-LoRA key owner state")
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
                spec, read_floats(blob, spec.d_out * spec.rank, spec.name).reshape(spec.d_out, spec.rank)
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
    header, blobs = read_frame(OWNER, frame_magic(OWNER) + bytes([FRAME_VERSION]) + body, "unencrypted key owner state")
    state = pack_frame(OWNER, {"modules": header.get("modules", []), "decryptions": 0}, blobs)
    return sealed_state.seal(state, passphrase)
