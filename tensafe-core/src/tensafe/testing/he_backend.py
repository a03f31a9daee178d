"""Conformance tests for :class:`tensafe.interfaces.HEBackend`.

Each operation is checked against the same computation on plaintext, within a
stated absolute bound (the class attributes below, for the default parameters
of :meth:`HEBackendConformance.he_config`: N=8192, primes 60/40/40/60 bits,
scale 2^40, values in [-1, 1]). Every kind of bad input must raise a
:class:`tensafe.errors.TensafeError`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from tensafe.config import HEConfig
from tensafe.errors import ConfigError, TensafeError
from tensafe.interfaces import HEBackend, slot_sum_rotations
from tensafe.testing.support import fresh_plugin_manager

SEED = 20260917


def _numpy() -> Any:
    return pytest.importorskip("numpy", reason="the HE conformance suite needs numpy")


class HEBackendConformance:
    """Subclass with ``backend_name = "..."`` to test a registered HE backend."""

    backend_name: ClassVar[str]
    #: Fresh encryption, addition, subtraction and adding a plaintext.
    FRESH_BOUND: ClassVar[float] = 1e-6
    #: A plaintext or ciphertext product, rescaled once.
    PRODUCT_BOUND: ClassVar[float] = 1e-6
    #: One rotation (key switching adds noise).
    ROTATION_BOUND: ClassVar[float] = 1e-5
    #: A sum of all slots, relative to the number of slots.
    SUM_BOUND_PER_SLOT: ClassVar[float] = 1e-6

    @classmethod
    def he_config(cls) -> HEConfig:
        return HEConfig(backend=cls.backend_name, coeff_mod_bit_sizes=[60, 40, 40, 60], scale_bits=40)

    @classmethod
    def make(cls) -> HEBackend:
        backend: HEBackend = fresh_plugin_manager(autoload=True).registry.he_backend(cls.backend_name)
        return backend

    @pytest.fixture(scope="class")
    @classmethod
    def he(cls) -> HEBackend:
        backend = cls.make()
        probe = cls.make()
        probe.create_context(cls.he_config(), relinearization=False)
        backend.create_context(cls.he_config(), rotations=[*slot_sum_rotations(probe.slot_count), 3])
        return backend

    @pytest.fixture(scope="class")
    @classmethod
    def evaluator(cls, he: HEBackend) -> HEBackend:
        """A second context holding the public parameters, public and evaluation keys only."""
        other = cls.make()
        other.load_context(he.serialize_context())
        for kind in ("public", "relinearization", "galois"):
            other.load_key(kind, he.serialize_key(kind))
        return other

    def vectors(self, he: HEBackend, count: int = 2) -> list[Any]:
        np = _numpy()
        rng = np.random.default_rng(SEED)
        return [rng.uniform(-1.0, 1.0, he.slot_count) for _ in range(count)]

    @staticmethod
    def error(actual: Any, expected: Any) -> float:
        np = _numpy()
        return float(np.max(np.abs(np.asarray(actual)[: len(expected)] - expected)))

    # -- the contract -------------------------------------------------------------

    def test_is_an_he_backend(self, he: HEBackend) -> None:
        assert isinstance(he, HEBackend)
        assert he.slot_count >= 1024 and he.top_level >= 2

    def test_encrypt_decrypt(self, he: HEBackend) -> None:
        [x] = self.vectors(he, 1)
        assert self.error(he.decrypt(he.encrypt(x)), x) < self.FRESH_BOUND
        short = [0.5, -0.25, 0.125]
        assert self.error(he.decrypt(he.encrypt(short)), short) < self.FRESH_BOUND

    def test_add_subtract_add_plain(self, he: HEBackend) -> None:
        x, y = self.vectors(he)
        cx, cy = he.encrypt(x), he.encrypt(y)
        assert self.error(he.decrypt(he.add(cx, cy)), x + y) < 2 * self.FRESH_BOUND
        assert self.error(he.decrypt(he.subtract(cx, cy)), x - y) < 2 * self.FRESH_BOUND
        assert self.error(he.decrypt(he.add_plain(cx, y)), x + y) < 2 * self.FRESH_BOUND

    def test_multiply_plain_then_rescale(self, he: HEBackend) -> None:
        x, y = self.vectors(he)
        product = he.multiply_plain(he.encrypt(x), y)
        assert self.error(he.decrypt(product), x * y) < self.PRODUCT_BOUND
        rescaled = he.rescale(product)
        assert he.level(rescaled) == he.top_level - 1
        assert self.error(he.decrypt(rescaled), x * y) < self.PRODUCT_BOUND
        encoded = he.encode(y)
        assert self.error(he.decrypt(he.multiply_plain(he.encrypt(x), encoded)), x * y) < self.PRODUCT_BOUND

    def test_multiply_relinearised_then_rescale(self, he: HEBackend) -> None:
        x, y = self.vectors(he)
        product = he.rescale(he.multiply(he.encrypt(x), he.encrypt(y)))
        assert self.error(he.decrypt(product), x * y) < self.PRODUCT_BOUND

    def test_mod_switch_keeps_values_and_cuts_bytes(self, he: HEBackend) -> None:
        [x] = self.vectors(he, 1)
        ct = he.encrypt(x)
        lower = he.mod_switch(ct)
        assert he.level(lower) == he.level(ct) - 1
        assert self.error(he.decrypt(lower), x) < self.FRESH_BOUND
        assert len(he.serialize_ciphertext(lower)) < len(he.serialize_ciphertext(ct))

    def test_rotate(self, he: HEBackend) -> None:
        np = _numpy()
        [x] = self.vectors(he, 1)
        for steps in (1, 3):
            assert self.error(he.decrypt(he.rotate(he.encrypt(x), steps)), np.roll(x, -steps)) < self.ROTATION_BOUND

    def test_sum_slots(self, he: HEBackend) -> None:
        np = _numpy()
        [x] = self.vectors(he, 1)
        total = he.decrypt(he.sum_slots(he.encrypt(x)))
        bound = self.SUM_BOUND_PER_SLOT * he.slot_count
        assert float(np.max(np.abs(total - x.sum()))) < bound

    def test_ciphertext_bytes_round_trip(self, he: HEBackend) -> None:
        [x] = self.vectors(he, 1)
        ct = he.rescale(he.multiply_plain(he.encrypt(x), x))
        again = he.deserialize_ciphertext(he.serialize_ciphertext(ct))
        assert he.level(again) == he.level(ct)
        assert self.error(he.decrypt(again), x * x) < self.PRODUCT_BOUND

    # -- who can decrypt ------------------------------------------------------------

    def test_evaluator_computes_but_cannot_decrypt(self, he: HEBackend, evaluator: HEBackend) -> None:
        x, y = self.vectors(he)
        assert not evaluator.has_key("secret")
        assert all(evaluator.has_key(k) for k in ("public", "relinearization", "galois"))
        ct = evaluator.deserialize_ciphertext(he.serialize_ciphertext(he.encrypt(x)))
        result = evaluator.rotate(evaluator.multiply_plain(ct, y), 1)
        with pytest.raises(TensafeError, match="secret"):
            evaluator.decrypt(result)
        with pytest.raises(TensafeError):
            evaluator.serialize_key("secret")
        back = he.deserialize_ciphertext(evaluator.serialize_ciphertext(result))
        np = _numpy()
        assert self.error(he.decrypt(back), np.roll(x * y, -1)) < self.ROTATION_BOUND

    def test_serialised_context_and_public_keys_hold_no_secret(self, he: HEBackend) -> None:
        secret = he.serialize_key("secret")
        body = secret[-4096:]  # a stretch of the secret key's coefficients
        for blob in (he.serialize_context(), he.serialize_key("public"), he.serialize_key("relinearization")):
            assert body not in blob

    def test_secret_key_round_trip(self, he: HEBackend) -> None:
        owner = self.make()
        owner.load_context(he.serialize_context())
        owner.load_key("secret", he.serialize_key("secret"))
        owner.load_key("public", he.serialize_key("public"))
        [x] = self.vectors(he, 1)
        assert self.error(owner.decrypt(owner.deserialize_ciphertext(he.serialize_ciphertext(he.encrypt(x)))), x) < (
            self.FRESH_BOUND
        )

    # -- bad input ------------------------------------------------------------------

    def test_parameters_below_128_bit_security_are_rejected(self) -> None:
        backend = self.make()
        with pytest.raises(ConfigError, match="128-bit"):
            backend.create_context(HEConfig(poly_modulus_degree=4096, coeff_mod_bit_sizes=[60, 60, 60]))
        with pytest.raises(ConfigError, match="128-bit"):
            backend.create_context(HEConfig(poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 60, 60, 60]))
        with pytest.raises(ConfigError):
            backend.create_context(HEConfig(poly_modulus_degree=2048, coeff_mod_bit_sizes=[20, 20, 14]))

    def test_vector_longer_than_the_slots(self, he: HEBackend) -> None:
        with pytest.raises(TensafeError, match="slots"):
            he.encrypt([0.1] * (he.slot_count + 1))
        with pytest.raises(TensafeError, match="slots"):
            he.multiply_plain(he.encrypt([1.0]), [0.1] * (he.slot_count + 1))

    def test_exhausted_modulus_level(self, he: HEBackend) -> None:
        ct = he.encrypt([0.5])
        while he.level(ct) > 1:
            ct = he.rescale(he.multiply_plain(ct, [0.5]))
        with pytest.raises(TensafeError, match="level"):
            he.rescale(ct)
        with pytest.raises(TensafeError, match="level"):
            he.mod_switch(ct)
        with pytest.raises(TensafeError):
            he.multiply_plain(ct, [0.5])

    def test_mismatched_levels_and_contexts(self, he: HEBackend) -> None:
        x, y = self.vectors(he)
        with pytest.raises(TensafeError, match="level"):
            he.add(he.encrypt(x), he.mod_switch(he.encrypt(y)))
        other = self.make()
        other.create_context(HEConfig(coeff_mod_bit_sizes=[60, 40, 60]), relinearization=False)
        foreign = other.encrypt(x)
        with pytest.raises(TensafeError, match="context"):
            he.add(he.encrypt(x), foreign)
        with pytest.raises(TensafeError, match="context"):
            he.deserialize_ciphertext(other.serialize_ciphertext(foreign))
        with pytest.raises(TensafeError, match="context"):
            he.load_key("public", other.serialize_key("public"))

    def test_missing_keys_are_errors(self, he: HEBackend, evaluator: HEBackend) -> None:
        bare = self.make()
        bare.create_context(self.he_config(), relinearization=False)
        ct = bare.encrypt([0.5])
        with pytest.raises(TensafeError, match="relinearization"):
            bare.multiply(ct, ct)
        with pytest.raises(TensafeError, match="Galois"):
            bare.rotate(ct, 1)
        with pytest.raises(TensafeError, match="Galois"):
            evaluator.rotate(evaluator.encrypt([0.5]), 5)
        empty = self.make()
        empty.load_context(he.serialize_context())
        with pytest.raises(TensafeError, match="public"):
            empty.encrypt([0.5])

    def test_corrupted_bytes_are_errors(self, he: HEBackend) -> None:
        blobs = {
            "ciphertext": he.serialize_ciphertext(he.encrypt([0.5])),
            "context": he.serialize_context(),
            "public": he.serialize_key("public"),
            "secret": he.serialize_key("secret"),
            "relinearization": he.serialize_key("relinearization"),
        }
        for kind, blob in blobs.items():
            for offset in (0, len(blob) // 3, len(blob) - 1):
                broken = bytearray(blob)
                broken[offset] ^= 0x5A
                with pytest.raises(TensafeError):
                    self._load(kind, bytes(broken))
            with pytest.raises(TensafeError):
                self._load(kind, blob[: len(blob) // 2])
            with pytest.raises(TensafeError):
                self._load(kind, b"")
        with pytest.raises(TensafeError):
            self._load("secret", blobs["public"])

    def _load(self, kind: str, data: bytes) -> None:
        target = self.make()
        if kind == "context":
            target.load_context(data)
            return
        source = self.he_config()
        target.create_context(source, relinearization=False)
        if kind == "ciphertext":
            target.deserialize_ciphertext(data)
        else:
            target.load_key(kind, data)  # type: ignore[arg-type]
