"""TGSP streaming cost: pack and unpack of a 100 MB adapter payload against a bare AEAD pass.

The baseline, in the same run, encrypts and decrypts the same bytes with
AES-256-GCM in the same 64 KiB chunks and nothing else. Pack and unpack add
hashing, signing (Ed25519 + ML-DSA-65), key encapsulation (X25519 + ML-KEM-768),
file I/O and verification. Peak memory is the rise of the process' resident
high-water mark during each operation (reset through /proc/self/clear_refs).
Goals: throughput >= 0.8x the bare pass; peak < 64 MB over baseline.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

SIZE = 100 * 2**20
CHUNK = 64 * 2**10


def _vm(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _reset_peak() -> int:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
        refs.write("5")
    return _vm("VmRSS:")


def bare_aead(path: Path) -> float:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aead = AESGCM(AESGCM.generate_key(256))
    start = time.perf_counter()
    sealed = []
    with path.open("rb") as handle:
        index = 0
        while chunk := handle.read(CHUNK):
            nonce = index.to_bytes(12, "big")
            sealed.append(len(aead.decrypt(nonce, aead.encrypt(nonce, chunk, b"ad"), b"ad")))
            index += 1
    return time.perf_counter() - start


def main() -> int:
    from tensafe_tgsp import format as tgsp_format
    from tensafe_tgsp import keys

    work = Path(tempfile.mkdtemp(prefix="tgsp-bench-"))
    try:
        adapter = work / "adapter"
        adapter.mkdir()
        with (adapter / "adapter_model.safetensors").open("wb") as handle:
            for _ in range(SIZE // 2**20):
                handle.write(os.urandom(2**20))
        paths = keys.keygen(work / "keys", name="bench")
        baseline = bare_aead(adapter / "adapter_model.safetensors")

        base_rss = _reset_peak()
        start = time.perf_counter()
        tgsp_format.pack(
            adapter,
            work / "a.tgsp",
            signing_key=paths["signing_key"],
            recipients=[paths["recipient_public_key"]],
            base_model="bench",
        )
        pack_seconds = time.perf_counter() - start
        pack_peak = _vm("VmHWM:") - base_rss

        base_rss = _reset_peak()
        start = time.perf_counter()
        tgsp_format.unpack(
            work / "a.tgsp",
            recipient_key=paths["recipient_key"],
            trusted_signers=[paths["signing_public_key"]],
            destination=work / "out",
        )
        unpack_seconds = time.perf_counter() - start
        unpack_peak = _vm("VmHWM:") - base_rss
    finally:
        shutil.rmtree(work, ignore_errors=True)
    mb = SIZE / 2**20
    print(f"bare AES-256-GCM encrypt+decrypt: {mb / baseline:7.1f} MB/s")
    for label, seconds, peak in (("pack", pack_seconds, pack_peak), ("unpack", unpack_seconds, unpack_peak)):
        # The bare pass both encrypts and decrypts; each TGSP operation does one of the two.
        ratio = (mb / seconds) / (2 * mb / baseline)
        print(
            f"{label:<7} {mb / seconds:7.1f} MB/s  ratio {ratio:4.2f}x of one bare AEAD pass (goal >= 0.8)"
            f"  peak +{peak / 2**20:5.1f} MiB (goal < 64)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
