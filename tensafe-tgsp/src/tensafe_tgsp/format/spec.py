"""The constants SPEC.md names, and the sizes it defines in terms of them."""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping, Sequence
from typing import Any

from tensafe_tgsp.keys import (
    ED25519_PUBLIC_LEN,
    ED25519_SIGNATURE_LEN,
    MLDSA65_PUBLIC_LEN,
    MLDSA65_SIGNATURE_LEN,
    MLKEM768_CIPHERTEXT_LEN,
    X25519_PUBLIC_LEN,
)

MAGIC = b"\x89TGSP\r\n\x1a"
FORMAT_VERSION = 1
#: magic, version, flags, manifest_len, signature_len, recipients_len, payload_len (big-endian).
HEADER = struct.Struct(">8sHHIIIQ")
HEADER_LEN = HEADER.size
MAX_MANIFEST_LEN = 1 << 20
MAX_RECIPIENTS = 1024
CHUNK_SIZE = 1 << 16
TAG_LEN = 16
CHUNK_CT_LEN = CHUNK_SIZE + TAG_LEN
MAX_PAYLOAD_SIZE = 1 << 40
MAX_CHUNKS = -(-MAX_PAYLOAD_SIZE // CHUNK_SIZE)
MAX_FILES = 100_000
MAX_PATH_BYTES = 1024
MAX_COMPONENT_BYTES = 255
CONTENT_KEY_LEN = 32
NONCE_PREFIX_LEN = 8
WRAP_NONCE_LEN = 12
WRAPPED_KEY_LEN = CONTENT_KEY_LEN + TAG_LEN
FINGERPRINT_LEN = 32
SIGNATURE_BLOCK_LEN = ED25519_PUBLIC_LEN + MLDSA65_PUBLIC_LEN + ED25519_SIGNATURE_LEN + MLDSA65_SIGNATURE_LEN
RECIPIENT_ENTRY_LEN = FINGERPRINT_LEN + X25519_PUBLIC_LEN + MLKEM768_CIPHERTEXT_LEN + WRAP_NONCE_LEN + WRAPPED_KEY_LEN
RECIPIENT_COUNT = struct.Struct(">H")

SIGNATURE_DOMAIN = b"TGSP-v1 package signature\x00"
MLDSA_CONTEXT = b"TGSP-v1"
KEK_DOMAIN = b"TGSP-v1 key encryption key\x00"
WRAP_DOMAIN = b"TGSP-v1 content key\x00"
CHUNK_DOMAIN = b"TGSP-v1 payload chunk\x00"

ENTRY_END = 0x00
ENTRY_FILE = 0x01
ENTRY_HEAD = struct.Struct(">BH")
ENTRY_SIZE = struct.Struct(">Q")

AEAD_NAME = "AES-256-GCM"
MANIFEST_KEYS = frozenset(
    {
        "format",
        "format_version",
        "package_id",
        "created",
        "producer",
        "base_model",
        "lora",
        "files",
        "payload",
        "recipients",
        "privacy_certificate",
        "policy",
        "encrypted_adapter",
    }
)
#: Problems a refused certificate's error names, at most.
MAX_CERTIFICATE_PROBLEMS = 5

HEX64 = re.compile(r"[0-9a-f]{64}")
HEX_PREFIX = re.compile(r"[0-9a-f]{16}")
#: A UTC time as the manifest writes it (``created``, a ``not_after`` instant).
TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")
DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def archive_size(files: Sequence[Mapping[str, Any]]) -> int:
    """Size in bytes of the archive that holds ``files`` (entries plus the end marker)."""
    total = 1
    for entry in files:
        total += ENTRY_HEAD.size + len(str(entry["path"]).encode("utf-8")) + ENTRY_SIZE.size + int(entry["size"])
    return total


def chunk_count(payload_size: int) -> int:
    return -(-payload_size // CHUNK_SIZE)
