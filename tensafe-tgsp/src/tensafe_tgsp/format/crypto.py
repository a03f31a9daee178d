"""The cryptographic pieces: the signed message, chunk nonces and associated data, content-key wrapping."""

from __future__ import annotations

import hashlib
import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tensafe_tgsp.errors import IntegrityError
from tensafe_tgsp.format.spec import (
    CHUNK_DOMAIN,
    CONTENT_KEY_LEN,
    FINGERPRINT_LEN,
    KEK_DOMAIN,
    RECIPIENT_ENTRY_LEN,
    SIGNATURE_DOMAIN,
    WRAP_DOMAIN,
    WRAP_NONCE_LEN,
)
from tensafe_tgsp.keys import MLKEM768_CIPHERTEXT_LEN, X25519_PUBLIC_LEN, RecipientKey, RecipientPublicKey


def signed_message(header: bytes, manifest: bytes, recipient_block: bytes, signer_fingerprint: bytes) -> bytes:
    """What both signatures sign (SPEC.md, "Signature block")."""
    return b"".join(
        (
            SIGNATURE_DOMAIN,
            hashlib.sha256(header).digest(),
            hashlib.sha256(manifest).digest(),
            hashlib.sha256(recipient_block).digest(),
            signer_fingerprint,
        )
    )


def chunk_nonce(prefix: bytes, index: int) -> bytes:
    return prefix + struct.pack(">I", index)


def chunk_aad(manifest_hash: bytes, index: int, final: bool) -> bytes:
    return CHUNK_DOMAIN + manifest_hash + struct.pack(">QB", index, 1 if final else 0)


def _kek(x25519_secret: bytes, kem_secret: bytes, manifest_hash: bytes, package_id: bytes, entry_head: bytes) -> bytes:
    info = KEK_DOMAIN + package_id + entry_head
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=manifest_hash, info=info).derive(x25519_secret + kem_secret)


def _wrap_aad(manifest_hash: bytes, fingerprint: bytes) -> bytes:
    return WRAP_DOMAIN + manifest_hash + fingerprint


def wrap_content_key(
    recipient: RecipientPublicKey, content_key: bytes, manifest_hash: bytes, package_id: bytes
) -> bytes:
    """One recipient entry: fingerprint, ephemeral X25519 key, ML-KEM ciphertext, nonce, wrapped key."""
    ephemeral = X25519PrivateKey.generate()
    x25519_secret = ephemeral.exchange(recipient.x25519)
    kem_secret, kem_ciphertext = recipient.ml_kem.encapsulate()
    head = recipient.fingerprint_bytes + ephemeral.public_key().public_bytes_raw() + kem_ciphertext
    kek = _kek(x25519_secret, kem_secret, manifest_hash, package_id, head)
    nonce = os.urandom(WRAP_NONCE_LEN)
    wrapped = AESGCM(kek).encrypt(nonce, content_key, _wrap_aad(manifest_hash, recipient.fingerprint_bytes))
    entry = head + nonce + wrapped
    assert len(entry) == RECIPIENT_ENTRY_LEN
    return entry


def unwrap_content_key(recipient: RecipientKey, entry: bytes, manifest_hash: bytes, package_id: bytes) -> bytes:
    """The content key from ``recipient``'s entry; :class:`IntegrityError` when it does not unwrap."""
    fp_end = FINGERPRINT_LEN
    eph_end = fp_end + X25519_PUBLIC_LEN
    ct_end = eph_end + MLKEM768_CIPHERTEXT_LEN
    nonce_end = ct_end + WRAP_NONCE_LEN
    fingerprint, ephemeral, kem_ciphertext = entry[:fp_end], entry[fp_end:eph_end], entry[eph_end:ct_end]
    nonce, wrapped = entry[ct_end:nonce_end], entry[nonce_end:]
    try:
        x25519_secret = recipient.x25519.exchange(X25519PublicKey.from_public_bytes(ephemeral))
        kem_secret = recipient.ml_kem.decapsulate(kem_ciphertext)
        kek = _kek(x25519_secret, kem_secret, manifest_hash, package_id, entry[:ct_end])
        content_key = AESGCM(kek).decrypt(nonce, wrapped, _wrap_aad(manifest_hash, fingerprint))
    except (InvalidTag, ValueError):
        raise IntegrityError("the content key does not unwrap with this recipient key") from None
    if len(content_key) != CONTENT_KEY_LEN:
        raise IntegrityError("the unwrapped content key has the wrong length")
    return content_key
