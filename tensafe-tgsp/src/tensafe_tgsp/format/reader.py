"""Reading a package: its layout, then :func:`inspect` (no checks) and :func:`verify` (no decryption)."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

from tensafe_tgsp._boundary import boundary
from tensafe_tgsp._regular_file import open_regular_file
from tensafe_tgsp.errors import (
    MalformedPackage,
    PackageIOError,
    SignatureInvalid,
    TrailingData,
    TruncatedPackage,
    UnsupportedVersion,
    UntrustedSigner,
)
from tensafe_tgsp.format.crypto import signed_message
from tensafe_tgsp.format.manifest import decode_manifest
from tensafe_tgsp.format.policy import check_policy
from tensafe_tgsp.format.spec import (
    CHUNK_CT_LEN,
    FINGERPRINT_LEN,
    FORMAT_VERSION,
    HEADER,
    HEADER_LEN,
    MAGIC,
    MAX_CHUNKS,
    MAX_MANIFEST_LEN,
    MAX_PAYLOAD_SIZE,
    MAX_RECIPIENTS,
    MLDSA_CONTEXT,
    RECIPIENT_COUNT,
    RECIPIENT_ENTRY_LEN,
    SIGNATURE_BLOCK_LEN,
    TAG_LEN,
    chunk_count,
)
from tensafe_tgsp.keys import (
    ED25519_PUBLIC_LEN,
    ED25519_SIGNATURE_LEN,
    MLDSA65_PUBLIC_LEN,
    SigningPublicKey,
    load_signing_public_key,
)


@dataclass(frozen=True)
class Layout:
    """The regions of a package whose header and lengths have been checked (nothing is verified yet)."""

    version: int
    header: bytes
    manifest: bytes
    signature_block: bytes
    recipient_block: bytes
    payload_offset: int
    payload_len: int


def read_exact(handle: BinaryIO, length: int, what: str) -> bytes:
    """``length`` bytes of the package; :class:`TruncatedPackage` if it ends first."""
    parts: list[bytes] = []
    remaining = length
    while remaining:
        try:
            piece = handle.read(remaining)
        except OSError as exc:
            raise PackageIOError(f"cannot read the package: {exc.strerror or exc}") from None
        if not piece:
            raise TruncatedPackage(f"the package ends inside its {what}")
        parts.append(piece)
        remaining -= len(piece)
    return b"".join(parts)


@contextlib.contextmanager
def open_package(path: str | os.PathLike[str]) -> Iterator[tuple[BinaryIO, int]]:
    """The package file, open for reading, and its size; refused at once unless it is a regular file."""
    if not isinstance(path, (str, os.PathLike)):
        raise PackageIOError(f"a package path is a str or os.PathLike, not {type(path).__name__}")
    try:
        fd, info = open_regular_file(path, what="package", error=MalformedPackage)
    except FileNotFoundError:
        raise PackageIOError(f"package not found: {path}") from None
    except OSError as exc:
        raise PackageIOError(f"cannot open package {path}: {exc.strerror or exc}") from None
    except (ValueError, TypeError) as exc:
        raise PackageIOError(f"cannot open package {path!r}: {exc}") from None
    with os.fdopen(fd, "rb") as handle:
        yield handle, info.st_size


def _payload_shape(payload_len: int) -> tuple[int, int] | None:
    """(plaintext size, chunks) for a payload of ``payload_len`` ciphertext bytes, or None if impossible."""
    chunks = -(-payload_len // CHUNK_CT_LEN)
    size = payload_len - chunks * TAG_LEN
    if chunks < 1 or chunks > MAX_CHUNKS or size < 1 or size > MAX_PAYLOAD_SIZE or chunk_count(size) != chunks:
        return None
    return size, chunks


def _check_lengths(manifest_len: int, signature_len: int, recipients_len: int, payload_len: int) -> None:
    """Each region length of the header against its rule (SPEC.md, "Header")."""
    if not 1 <= manifest_len <= MAX_MANIFEST_LEN:
        raise MalformedPackage(f"manifest length {manifest_len} is outside 1..{MAX_MANIFEST_LEN}")
    if signature_len != SIGNATURE_BLOCK_LEN:
        raise MalformedPackage(f"signature block length {signature_len} is not {SIGNATURE_BLOCK_LEN}")
    count, extra = divmod(recipients_len - RECIPIENT_COUNT.size, RECIPIENT_ENTRY_LEN)
    if extra or not 1 <= count <= MAX_RECIPIENTS:
        raise MalformedPackage(f"recipient block length {recipients_len} does not hold 1..{MAX_RECIPIENTS} entries")
    if _payload_shape(payload_len) is None:
        raise MalformedPackage(f"payload length {payload_len} is not a valid chunked payload (at most 1 TiB)")


def read_layout(handle: BinaryIO, file_size: int) -> Layout:
    """Read and bound-check the header, then read the manifest, signature and recipient regions.

    Every length is checked against its bound and the total against the file's
    size before anything else is read, so no field can make this allocate more
    than the regions' fixed maxima (about 2.3 MiB).
    """
    try:
        head = handle.read(HEADER_LEN)
    except OSError as exc:
        raise PackageIOError(f"cannot read the package: {exc.strerror or exc}") from None
    if len(head) < HEADER_LEN:
        if head[: len(MAGIC)] != MAGIC[: len(head)]:
            raise MalformedPackage("not a TGSP package (bad magic)")
        raise TruncatedPackage(f"the package ends inside its {HEADER_LEN}-byte header ({file_size} bytes)")
    try:
        magic, version, flags, manifest_len, signature_len, recipients_len, payload_len = HEADER.unpack(head)
    except struct.error:
        raise MalformedPackage("unreadable header") from None
    if magic != MAGIC:
        raise MalformedPackage("not a TGSP package (bad magic)")
    if version != FORMAT_VERSION:
        raise UnsupportedVersion(f"TGSP format version {version} is not supported (this reader knows {FORMAT_VERSION})")
    if flags != 0:
        raise MalformedPackage(f"unknown header flags {flags:#06x}")
    _check_lengths(manifest_len, signature_len, recipients_len, payload_len)
    payload_offset = HEADER_LEN + manifest_len + signature_len + recipients_len
    total = payload_offset + payload_len
    if file_size < total:
        raise TruncatedPackage(f"the package is {file_size} bytes but its header declares {total}")
    if file_size > total:
        raise TrailingData(f"the package is {file_size} bytes but its header declares {total}")
    manifest = read_exact(handle, manifest_len, "manifest")
    signature_block = read_exact(handle, signature_len, "signature block")
    recipient_block = read_exact(handle, recipients_len, "recipient block")
    return Layout(version, head, manifest, signature_block, recipient_block, payload_offset, payload_len)


def parse_recipient_block(block: bytes) -> list[bytes]:
    """The recipient entries (each :data:`RECIPIENT_ENTRY_LEN` bytes), fingerprints distinct."""
    (count,) = RECIPIENT_COUNT.unpack_from(block)
    if len(block) != RECIPIENT_COUNT.size + count * RECIPIENT_ENTRY_LEN or not 1 <= count <= MAX_RECIPIENTS:
        raise MalformedPackage("the recipient count does not match the recipient block's length")
    entries = [
        block[RECIPIENT_COUNT.size + i * RECIPIENT_ENTRY_LEN : RECIPIENT_COUNT.size + (i + 1) * RECIPIENT_ENTRY_LEN]
        for i in range(count)
    ]
    if len({entry[:FINGERPRINT_LEN] for entry in entries}) != count:
        raise MalformedPackage("the recipient block names a recipient twice")
    return entries


def trusted_keys(
    trusted_signers: Iterable[SigningPublicKey | str | os.PathLike[str]],
) -> dict[bytes, SigningPublicKey]:
    """The trusted signer keys (loaded from their files where paths are given), by fingerprint."""
    if isinstance(trusted_signers, (str, os.PathLike, SigningPublicKey)):
        trusted_signers = [trusted_signers]
    keys: dict[bytes, SigningPublicKey] = {}
    for item in trusted_signers:
        key = item if isinstance(item, SigningPublicKey) else load_signing_public_key(item)
        keys[key.fingerprint_bytes] = key
    return keys


def verify_layout(
    layout: Layout,
    trusted: Mapping[bytes, SigningPublicKey],
    *,
    now: dt.datetime | None = None,
    base_model: str | None = None,
) -> dict[str, Any]:
    """Signatures, trust, manifest, recipient block and policy of a read package; returns the manifest.

    The payload is not read: only decrypting it authenticates it (see :func:`tensafe_tgsp.format.unpack`).
    """
    if not trusted:
        raise UntrustedSigner("no trusted signer keys were given, so no package can be trusted")
    block = layout.signature_block
    ed_end = ED25519_PUBLIC_LEN
    ml_end = ed_end + MLDSA65_PUBLIC_LEN
    sig_end = ml_end + ED25519_SIGNATURE_LEN
    try:
        signer = SigningPublicKey.from_raw(block[:ed_end], block[ed_end:ml_end])
    except ValueError:
        raise SignatureInvalid("the signature block does not hold a valid signer key") from None
    message = signed_message(layout.header, layout.manifest, layout.recipient_block, signer.fingerprint_bytes)
    signer.verify(block[ml_end:sig_end], block[sig_end:], message, MLDSA_CONTEXT)
    known = trusted.get(signer.fingerprint_bytes)
    if known is None or known.raw != signer.raw:
        raise UntrustedSigner(f"the package is validly signed, but by {signer.fingerprint}, which is not trusted")
    manifest = decode_manifest(layout.manifest)
    if manifest["format_version"] != layout.version:
        raise MalformedPackage("the manifest's format version differs from the header's")
    if manifest["producer"]["fingerprint"] != signer.fingerprint:
        raise MalformedPackage("the manifest names a producer other than the key that signed it")
    payload = manifest["payload"]
    if (payload["size"], payload["chunks"]) != _payload_shape(layout.payload_len):
        raise MalformedPackage("the header's payload length differs from the manifest's")
    entries = parse_recipient_block(layout.recipient_block)
    if [entry[:FINGERPRINT_LEN].hex() for entry in entries] != manifest["recipients"]:
        raise MalformedPackage("the recipient block differs from the manifest's recipients")
    check_policy(manifest, now=now, base_model=base_model)
    return manifest


@boundary(MalformedPackage, PackageIOError)
def embedded_signer(path: str | os.PathLike[str]) -> SigningPublicKey:
    """The public key in the package's signature block, NOT verified and NOT trusted.

    Only for an explicit user override that accepts an unknown signer; the
    signatures are still checked against it.
    """
    with open_package(path) as (handle, size):
        block = read_layout(handle, size).signature_block
    try:
        return SigningPublicKey.from_raw(
            block[:ED25519_PUBLIC_LEN], block[ED25519_PUBLIC_LEN : ED25519_PUBLIC_LEN + MLDSA65_PUBLIC_LEN]
        )
    except ValueError:
        raise SignatureInvalid("the signature block does not hold a valid signer key") from None


@boundary(MalformedPackage, PackageIOError)
def inspect(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The package's manifest, parsed and checked for form but NOT verified.

    Nothing here is authenticated: anyone can write a package that says
    anything. Use :func:`verify` before trusting a single field.
    """
    with open_package(path) as (handle, size):
        layout = read_layout(handle, size)
        return decode_manifest(layout.manifest)


@boundary(MalformedPackage, PackageIOError)
def verify(
    path: str | os.PathLike[str],
    trusted_signers: Iterable[SigningPublicKey | str | os.PathLike[str]],
    *,
    base_model: str | None = None,
    now: dt.datetime | None = None,
) -> dict[str, Any]:
    """Verify a package without decrypting anything; returns its manifest.

    Checks the header and lengths (the file's size included), both signatures
    (Ed25519 and ML-DSA-65) by a key in ``trusted_signers`` over the header,
    manifest and recipient block, the manifest's form, the recipient block
    against the manifest, and the policy (see :func:`check_policy`).

    It does NOT authenticate the payload (the encrypted files): the signatures
    do not cover its bytes, and only :func:`unpack`, which needs a recipient
    key, checks it, by the AES-GCM tag of every chunk and the SHA-256 of every
    file against the signed content index.
    """
    trusted = trusted_keys(trusted_signers)
    with open_package(path) as (handle, size):
        return verify_layout(read_layout(handle, size), trusted, now=now, base_model=base_model)
