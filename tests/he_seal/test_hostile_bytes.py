"""Bytes crafted to pass the envelope's digest still cannot crash the interpreter.

The envelope's SHA-256 catches accidental corruption; a hostile sender can
recompute it. These payloads then reach the SEAL-level checks, and SEAL's own.
They run in a child process, so that a crash would fail the test, not end the run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent(
    """
    import hashlib, json, struct
    from tensafe.config import HEConfig
    from tensafe.errors import TensafeError
    from tensafe_he_seal.backend import ENVELOPE, SealCKKSBackend

    def rewrap(envelope, payload):
        magic, tag, context_id, _, _ = ENVELOPE.unpack_from(envelope)
        return ENVELOPE.pack(magic, tag, context_id, hashlib.sha256(payload).digest(), len(payload)) + payload

    he = SealCKKSBackend()
    he.create_context(HEConfig(coeff_mod_bit_sizes=[60, 40, 40, 60]))
    ct = he.serialize_ciphertext(he.encrypt([0.5, 0.25]))
    pk = he.serialize_key("public")
    rk = he.serialize_key("relinearization")
    head = ENVELOPE.size

    def edited(envelope, at, data):
        body = bytearray(envelope[head:])
        body[at : at + len(data)] = data
        return rewrap(envelope, bytes(body))

    ff = b"\\xff" * 16
    half = (len(rk) - head) // 2
    cases = {
        "coefficients above the modulus": ("c", edited(ct, 2000, ff)),
        "another parms_id": ("c", edited(ct, 20, bytes([ct[head + 20] ^ 0xFF]))),
        "nine polynomials": ("c", edited(ct, 16 + 33, struct.pack("<Q", 9))),
        "2^40 primes": ("c", edited(ct, 16 + 49, struct.pack("<Q", 1 << 40))),
        "huge SEAL size": ("c", edited(ct, 8, struct.pack("<Q", 1 << 62))),
        "NaN scale": ("c", edited(ct, 16 + 57, struct.pack("<d", float("nan")))),
        "compressed": ("c", edited(ct, 4, b"\\x02")),
        "public key above the modulus": ("public", edited(pk, 5000, ff)),
        "relin key header": ("relinearization", edited(rk, 100, ff[:8])),
        "relin key data": ("relinearization", edited(rk, half, ff[:8])),
        "relin key cut short": ("relinearization", rewrap(rk, rk[head:][: half // 2])),
    }
    results = {}
    for name, (kind, data) in cases.items():
        target = SealCKKSBackend()
        target.create_context(HEConfig(coeff_mod_bit_sizes=[60, 40, 40, 60]))
        try:
            target.deserialize_ciphertext(data) if kind == "c" else target.load_key(kind, data)
            results[name] = "accepted"
        except TensafeError as exc:
            results[name] = type(exc).__name__
    print(json.dumps(results))
    """
)


def test_hostile_payloads_raise_tensafe_errors_without_crashing() -> None:
    child = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr[-2000:]
    results = json.loads(child.stdout)
    assert len(results) == 11
    assert all(outcome != "accepted" for outcome in results.values()), results
