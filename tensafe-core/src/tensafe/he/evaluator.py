"""The HE-LoRA evaluator: the public adapter, the masks made ahead of time, and the work on ``x``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tensafe.errors import BackendError, UsageError
from tensafe.he._numpy import numpy_module as _numpy
from tensafe.he.frames import ADAPTER, PAD, key_id, pack_frame, read_floats, read_frame
from tensafe.he.hiding import AdapterNorms, HidingLedger, MaskBits, gaussian
from tensafe.he.messages import LoraRequest, LoraResponse, LoraTransport, ModuleRequest
from tensafe.he.packing import LORA_LEVEL, VALUE_ROOM_BITS, ModuleSpec, lora_scales, out_groups

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

    from tensafe.he.pool import MaskPool
    from tensafe.interfaces import HEBackend


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
        header, blobs = read_frame(ADAPTER, adapter, "encrypted HE-LoRA adapter")
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
            self.modules[spec.name] = _EncryptedModule(spec, norms, cts[:n_a], cts[n_a:], out_groups(spec.b_layout))
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
        return pack_frame(PAD, {"rows": len(pad.row_masks), "outs": len(pad.outs)}, blobs)

    def pad_from_bytes(self, name: str, data: bytes) -> Pad:
        module = self.module(name)
        header, blobs = read_frame(PAD, data, "HE-LoRA pad")
        rows, outs = int(header.get("rows", -1)), int(header.get("outs", -1))
        if rows != len(module.a) or outs != len(module.groups) or len(blobs) != rows + outs + 1:
            raise BackendError(f"an HE-LoRA pad for {name!r} has the wrong shape")
        masks = [self.backend.deserialize_ciphertext(b) for b in blobs[:rows]]
        return Pad(masks, blobs[rows : rows + outs], read_floats(blobs[-1], module.spec.d_out, "HE-LoRA pad"))


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
