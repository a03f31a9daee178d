"""Helpers for the tensafe-tgsp tests: key-holding parties, sample adapters, region maps and crafted packages.

``craft_package`` is test-only: it writes archives with unchecked entry names
and types through the low-level :func:`tensafe_tgsp.format.write_package`,
which is how an attacker who knows a content key (a co-recipient, or a
malicious producer) could build a package that pack() never would.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tensafe_tgsp import format as fmt
from tensafe_tgsp.keys import (
    RecipientKey,
    RecipientPublicKey,
    SigningKey,
    keygen,
    load_recipient_key,
    load_signing_key,
)


@dataclass(frozen=True)
class Party:
    """Someone with a signing key pair and a recipient key pair on disk."""

    name: str
    paths: dict[str, Path]
    signing: SigningKey
    recipient: RecipientKey

    @property
    def sign_pub(self) -> Path:
        return self.paths["signing_public_key"]

    @property
    def sign_key(self) -> Path:
        return self.paths["signing_key"]

    @property
    def recipient_pub(self) -> Path:
        return self.paths["recipient_public_key"]

    @property
    def recipient_key(self) -> Path:
        return self.paths["recipient_key"]


def make_party(directory: Path, name: str) -> Party:
    paths = keygen(directory, name)
    return Party(name, paths, load_signing_key(paths["signing_key"]), load_recipient_key(paths["recipient_key"]))


def safetensors_bytes(count: int, seed: int = 0) -> bytes:
    """A valid safetensors file holding one float32 tensor of ``count`` pseudo-random values."""
    header = json.dumps(
        {"lora_A.weight": {"dtype": "F32", "shape": [count], "data_offsets": [0, 4 * count]}, "__metadata__": {}}
    ).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + random.Random(seed).randbytes(4 * count)


def safetensors_header(data: bytes) -> dict[str, Any]:
    """The JSON header of a safetensors file (a little-endian u64 length, then the JSON)."""
    (length,) = struct.unpack_from("<Q", data)
    header: dict[str, Any] = json.loads(data[8 : 8 + length])
    return header


def adapter_files(floats: int = 40_000, seed: int = 0) -> dict[str, bytes]:
    """A PEFT-like adapter: config plus weights (160 KB by default, so the payload has three chunks)."""
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    return {
        "adapter_config.json": json.dumps(config).encode(),
        "adapter_model.safetensors": safetensors_bytes(floats, seed),
    }


CERTIFICATE: dict[str, Any] = {
    "accountant": "rdp",
    "epsilon": 2.9731,
    "delta": 1e-05,
    "steps": 300,
    "sampling_rate": 0.04,
    "noise_multiplier": 1.1,
    "max_grad_norm": 1.0,
    "target_epsilon": 3.0,
}


def regions(data: bytes) -> dict[str, tuple[int, int]]:
    """Byte ranges [start, end) of every header field and region of a package, and of each payload chunk."""
    _, _, _, m, s, r, p = fmt.HEADER.unpack(data[: fmt.HEADER_LEN])
    spans = {
        "magic": (0, 8),
        "version": (8, 10),
        "flags": (10, 12),
        "manifest_len": (12, 16),
        "signature_len": (16, 20),
        "recipients_len": (20, 24),
        "payload_len": (24, 32),
    }
    start = fmt.HEADER_LEN
    for name, length in (("manifest", m), ("signature", s), ("recipients", r), ("payload", p)):
        spans[name] = (start, start + length)
        start += length
    for i, span in enumerate(chunk_spans(data)):
        spans[f"chunk{i}"] = span
    return spans


def chunk_spans(data: bytes) -> list[tuple[int, int]]:
    _, _, _, m, s, r, p = fmt.HEADER.unpack(data[: fmt.HEADER_LEN])
    start = fmt.HEADER_LEN + m + s + r
    spans = []
    while start < fmt.HEADER_LEN + m + s + r + p:
        end = min(start + fmt.CHUNK_CT_LEN, len(data))
        spans.append((start, end))
        start = end
    return spans


def craft_package(
    output: Path,
    *,
    producer: Party,
    recipients: Sequence[RecipientPublicKey],
    entries: Sequence[tuple[int, bytes, bytes]],
    index_paths: Sequence[str] | None = None,
    base_model: str = "tiny-base",
) -> None:
    """Write a package whose archive holds ``entries`` = (type byte, raw path, content), unchecked.

    The signed content index lists ``index_paths`` (default: the entries' own
    paths) with the entries' sizes and hashes; keep each index path the same
    length in bytes as its entry's path so that the signed payload size matches.
    """
    archive = b"".join(
        struct.pack(">BH", kind, len(path)) + path + struct.pack(">Q", len(body)) + body for kind, path, body in entries
    )
    archive += b"\x00"
    paths = list(index_paths) if index_paths is not None else [path.decode() for _, path, _ in entries]
    files = [
        {"path": path, "size": len(body), "sha256": hashlib.sha256(body).hexdigest()}
        for path, (_, _, body) in zip(paths, entries, strict=True)
    ]
    manifest = {
        "format": "TGSP",
        "format_version": 1,
        "package_id": str(uuid.uuid4()),
        "created": fmt.utc_now(),
        "producer": {"fingerprint": producer.signing.fingerprint},
        "base_model": {"id": base_model, "sha256": None, "revision": None},
        "lora": {},
        "files": files,
        "payload": {
            "aead": fmt.AEAD_NAME,
            "chunk_size": fmt.CHUNK_SIZE,
            "size": len(archive),
            "chunks": fmt.chunk_count(len(archive)),
            "nonce_prefix": os.urandom(8).hex(),
        },
        "recipients": [r.fingerprint for r in recipients],
        "privacy_certificate": None,
        "policy": None,
        "encrypted_adapter": None,
    }
    fmt.write_package(
        output, manifest=manifest, plaintext=[archive], signing_key=producer.signing, recipients=recipients
    )


def listing(directory: Path) -> list[str]:
    """Everything under ``directory``, recursively, as sorted relative paths (hidden files included)."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))
