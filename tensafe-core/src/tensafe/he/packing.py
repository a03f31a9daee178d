"""How HE-LoRA packs an adapter's rows and columns into CKKS slots, and the scales it works at."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tensafe.errors import BackendError, UsageError
from tensafe.he._numpy import numpy_module as _numpy

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

    from tensafe.interfaces import HEBackend

#: Levels an adapter ciphertext needs: one plaintext product, no rescale (see THREAT_MODEL.md).
LORA_LEVEL = 2
#: Bits between the product's scale and the level's modulus: room for masked values and a margin.
VALUE_ROOM_BITS = 30
#: Scale of the per-token plaintexts: x and t encode to about 2^-24 per slot, far below the flood.
TOKEN_SCALE_BITS = 30


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


def out_groups(layout: Layout) -> list[list[int]]:
    """B ciphertexts whose segments map slot-for-slot onto the same output chunks: their products add up."""
    groups: dict[tuple[tuple[int, int, int], ...], list[int]] = {}
    for k in range(layout.ciphertexts):
        signature = tuple((chunk, offset, length) for _, chunk, offset, length in layout.placed(k))
        groups.setdefault(signature, []).append(k)
    return list(groups.values())
