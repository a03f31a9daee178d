"""The TGSP package format, version 1: pack, inspect, verify and unpack.

SPEC.md in this distribution is the normative, byte-for-byte description; the
constants it names are in :mod:`~tensafe_tgsp.format.spec`. In short, a package is::

    header (32 bytes) | manifest | signature block | recipient block | payload

* the **header** holds the magic, the format version and the length of every
  region, each bounded before anything is read or allocated;
* the **manifest** is canonical JSON: who signed it, the base model, the LoRA
  config, every file's path, size and SHA-256, the payload's size, the
  recipients, the privacy certificate and the policy;
* the **signature block** holds the signer's Ed25519 and ML-DSA-65 public keys
  and two signatures over the SHA-256 of the header, the manifest and the
  recipient block; both must verify, and the signer must be trusted;
* the **recipient block** wraps a random content key for each recipient under a
  key derived (HKDF-SHA256) from an X25519 and an ML-KEM-768 shared secret;
* the **payload** is an archive of the files, encrypted with AES-256-GCM in
  64 KiB chunks whose nonces and associated data bind each chunk's index, the
  final-chunk flag and the manifest's hash.

:func:`verify` checks everything but the payload without decrypting anything;
:func:`unpack` verifies first, then decrypts chunk by chunk, checks every file
against the signed content index, and only renames the finished directory
into place once every check has passed. Pack and unpack stream: memory use does
not grow with the size of the adapter.

The modules, in the order a package is read: ``spec`` (constants), ``paths``,
``certificate``, ``policy`` and ``manifest`` (the manifest's fields),
``crypto`` (signed message, chunk nonces, key wrapping), ``reader`` (layout,
inspect, verify), ``staging`` and ``unpacking``, and ``packing``. This package
re-exports their public names.
"""

from __future__ import annotations

from tensafe_tgsp.format.certificate import (
    one_line,
    parse_certificate,
    validate_certificate,
)
from tensafe_tgsp.format.crypto import (
    chunk_aad,
    chunk_nonce,
    signed_message,
    unwrap_content_key,
    wrap_content_key,
)
from tensafe_tgsp.format.manifest import (
    decode_manifest,
    encode_manifest,
    validate_manifest,
)

# Tests replace its ``pieces`` to simulate a file that changes while it is packed.
from tensafe_tgsp.format.packing import _Source as _Source
from tensafe_tgsp.format.packing import (
    pack,
    utc_now,
    write_package,
)
from tensafe_tgsp.format.paths import (
    check_path,
)
from tensafe_tgsp.format.policy import (
    check_policy,
    normalize_not_after,
)
from tensafe_tgsp.format.reader import (
    Layout,
    embedded_signer,
    inspect,
    parse_recipient_block,
    read_layout,
    verify,
    verify_layout,
)
from tensafe_tgsp.format.spec import (
    AEAD_NAME,
    CHUNK_CT_LEN,
    CHUNK_DOMAIN,
    CHUNK_SIZE,
    CONTENT_KEY_LEN,
    ENTRY_END,
    ENTRY_FILE,
    ENTRY_HEAD,
    ENTRY_SIZE,
    FINGERPRINT_LEN,
    FORMAT_VERSION,
    HEADER,
    HEADER_LEN,
    KEK_DOMAIN,
    MAGIC,
    MANIFEST_KEYS,
    MAX_CERTIFICATE_PROBLEMS,
    MAX_CHUNKS,
    MAX_COMPONENT_BYTES,
    MAX_FILES,
    MAX_MANIFEST_LEN,
    MAX_PATH_BYTES,
    MAX_PAYLOAD_SIZE,
    MAX_RECIPIENTS,
    MLDSA_CONTEXT,
    NONCE_PREFIX_LEN,
    RECIPIENT_COUNT,
    RECIPIENT_ENTRY_LEN,
    SIGNATURE_BLOCK_LEN,
    SIGNATURE_DOMAIN,
    TAG_LEN,
    WRAP_DOMAIN,
    WRAP_NONCE_LEN,
    WRAPPED_KEY_LEN,
    archive_size,
    chunk_count,
)
from tensafe_tgsp.format.unpacking import (
    extract_payload,
    unpack,
)

__all__ = [
    "AEAD_NAME",
    "CHUNK_CT_LEN",
    "CHUNK_DOMAIN",
    "CHUNK_SIZE",
    "CONTENT_KEY_LEN",
    "ENTRY_END",
    "ENTRY_FILE",
    "ENTRY_HEAD",
    "ENTRY_SIZE",
    "FINGERPRINT_LEN",
    "FORMAT_VERSION",
    "HEADER",
    "HEADER_LEN",
    "KEK_DOMAIN",
    "MAGIC",
    "MANIFEST_KEYS",
    "MAX_CERTIFICATE_PROBLEMS",
    "MAX_CHUNKS",
    "MAX_COMPONENT_BYTES",
    "MAX_FILES",
    "MAX_MANIFEST_LEN",
    "MAX_PATH_BYTES",
    "MAX_PAYLOAD_SIZE",
    "MAX_RECIPIENTS",
    "MLDSA_CONTEXT",
    "NONCE_PREFIX_LEN",
    "RECIPIENT_COUNT",
    "RECIPIENT_ENTRY_LEN",
    "SIGNATURE_BLOCK_LEN",
    "SIGNATURE_DOMAIN",
    "TAG_LEN",
    "WRAPPED_KEY_LEN",
    "WRAP_DOMAIN",
    "WRAP_NONCE_LEN",
    "Layout",
    "archive_size",
    "check_path",
    "check_policy",
    "chunk_aad",
    "chunk_count",
    "chunk_nonce",
    "decode_manifest",
    "embedded_signer",
    "encode_manifest",
    "extract_payload",
    "inspect",
    "normalize_not_after",
    "one_line",
    "pack",
    "parse_certificate",
    "parse_recipient_block",
    "read_layout",
    "signed_message",
    "unpack",
    "unwrap_content_key",
    "utc_now",
    "validate_certificate",
    "validate_manifest",
    "verify",
    "verify_layout",
    "wrap_content_key",
    "write_package",
]
