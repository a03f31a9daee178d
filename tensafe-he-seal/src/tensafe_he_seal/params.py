"""CKKS parameters and the 128-bit security bound they must meet.

The bound is the Homomorphic Encryption Standard's table (homomorphicencryption.org,
classical security, ternary secret, error sigma 3.2) that SEAL also enforces:
for each ring dimension N, the largest total coefficient modulus, in bits,
that still gives 128-bit security.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tensafe.config import HEConfig
from tensafe.errors import ConfigError

#: N -> largest total coefficient-modulus bit count at 128-bit security (HE Standard, Table 1).
MAX_COEFF_BITS_128 = {4096: 109, 8192: 218, 16384: 438, 32768: 881}
#: SEAL's limits on one prime of the coefficient modulus.
PRIME_BITS = (20, 60)


@dataclass(frozen=True)
class CKKSParameters:
    """Validated public parameters of a CKKS context."""

    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int

    @property
    def total_bits(self) -> int:
        return sum(self.coeff_mod_bit_sizes)

    @property
    def data_levels(self) -> int:
        """Primes that carry data; the last prime is SEAL's special (key-switching) prime."""
        return len(self.coeff_mod_bit_sizes) - 1

    def to_json(self) -> dict[str, Any]:
        return {
            "scheme": "ckks",
            "poly_modulus_degree": self.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes),
            "scale_bits": self.scale_bits,
        }

    def encode(self) -> bytes:
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode()


def validate(poly_modulus_degree: Any, coeff_mod_bit_sizes: Any, scale_bits: Any) -> CKKSParameters:
    """Parameters that meet 128-bit security; anything else raises :class:`ConfigError` saying why."""
    if not isinstance(poly_modulus_degree, int) or poly_modulus_degree not in MAX_COEFF_BITS_128:
        raise ConfigError(
            f"he.poly_modulus_degree must be one of {sorted(MAX_COEFF_BITS_128)} for 128-bit security, "
            f"not {poly_modulus_degree!r}"
        )
    if (
        not isinstance(coeff_mod_bit_sizes, list | tuple)
        or not 3 <= len(coeff_mod_bit_sizes) <= 16
        or not all(isinstance(b, int) and PRIME_BITS[0] <= b <= PRIME_BITS[1] for b in coeff_mod_bit_sizes)
    ):
        raise ConfigError(
            f"he.coeff_mod_bit_sizes must list 3 to 16 prime sizes of {PRIME_BITS[0]} to {PRIME_BITS[1]} bits "
            "(at least two data primes and the special prime)"
        )
    bound = MAX_COEFF_BITS_128[poly_modulus_degree]
    total = sum(coeff_mod_bit_sizes)
    if total > bound:
        raise ConfigError(
            f"he.coeff_mod_bit_sizes total {total} bits, above the {bound} bits that give 128-bit security at "
            f"N={poly_modulus_degree} (Homomorphic Encryption Standard); use fewer or smaller primes or a larger N"
        )
    if not isinstance(scale_bits, int) or not 20 <= scale_bits < min(coeff_mod_bit_sizes[0], 60):
        raise ConfigError(
            f"he.scale_bits must be at least 20 and below the first prime's {coeff_mod_bit_sizes[0]} bits"
        )
    return CKKSParameters(poly_modulus_degree, tuple(coeff_mod_bit_sizes), scale_bits)


def from_config(config: HEConfig) -> CKKSParameters:
    return validate(config.poly_modulus_degree, list(config.coeff_mod_bit_sizes), config.scale_bits)
