"""The TGSP package format, version 1: pack, inspect, verify and unpack.

SPEC.md in this distribution is the normative, byte-for-byte description; the
constants below are the ones it names. In short, a package is::

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
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
import re
import shutil
import stat
import struct
import tempfile
import unicodedata
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import ValidationError

from tensafe.engine.ledger import PrivacyCertificate
from tensafe_tgsp._boundary import boundary
from tensafe_tgsp._canonical import canonical_json, load_json
from tensafe_tgsp.errors import (
    DestinationExists,
    IntegrityError,
    MalformedPackage,
    NotARecipient,
    PackageIOError,
    PackError,
    PolicyViolation,
    SignatureInvalid,
    TGSPError,
    TrailingData,
    TruncatedPackage,
    UnsafePath,
    UnsupportedVersion,
    UntrustedSigner,
)
from tensafe_tgsp.keys import (
    ED25519_PUBLIC_LEN,
    ED25519_SIGNATURE_LEN,
    MLDSA65_PUBLIC_LEN,
    MLDSA65_SIGNATURE_LEN,
    MLKEM768_CIPHERTEXT_LEN,
    X25519_PUBLIC_LEN,
    RecipientKey,
    RecipientPublicKey,
    SigningKey,
    SigningPublicKey,
    load_recipient_key,
    load_recipient_public_key,
    load_signing_key,
    load_signing_public_key,
)

# -- constants (SPEC.md) --------------------------------------------------------

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

_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX_PREFIX = re.compile(r"[0-9a-f]{16}")
_CREATED = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_FORBIDDEN_PATH_CHARS = re.compile(r"[\x00-\x1f\x7f\\:]")


# -- paths ----------------------------------------------------------------------


def check_path(path: Any) -> str:
    """Return ``path`` if it is a safe relative archive path, else raise :class:`UnsafePath`.

    Safe: a non-empty string of ``/``-separated components, at most 1024 UTF-8
    bytes (255 per component); no leading ``/``, no empty, ``.`` or ``..``
    component, no backslash, colon or control character.
    """
    if not isinstance(path, str) or not path:
        raise UnsafePath(f"unsafe path {path!r}: paths are non-empty strings")
    try:
        encoded = path.encode("utf-8")
    except UnicodeError:
        raise UnsafePath(f"unsafe path {path!r}: not encodable as UTF-8") from None
    if len(encoded) > MAX_PATH_BYTES:
        raise UnsafePath(f"unsafe path {path[:64]!r}...: longer than {MAX_PATH_BYTES} bytes")
    if path.startswith("/"):
        raise UnsafePath(f"unsafe path {path!r}: absolute paths are refused")
    if _FORBIDDEN_PATH_CHARS.search(path):
        raise UnsafePath(f"unsafe path {path!r}: backslashes, colons and control characters are refused")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise UnsafePath(f"unsafe path {path!r}: empty, '.' and '..' components are refused")
        if len(part.encode("utf-8")) > MAX_COMPONENT_BYTES:
            raise UnsafePath(f"unsafe path {path!r}: a component is longer than {MAX_COMPONENT_BYTES} bytes")
    return path


class _PathSet:
    """Paths seen so far; refuses duplicates, and a path that is both a file and a directory.

    Paths are compared after NFC normalisation and case folding, so no two
    entries can land on the same file on a case-insensitive file system.
    """

    def __init__(self) -> None:
        self._files: set[str] = set()
        self._dirs: set[str] = set()

    def add(self, path: str) -> None:
        key = unicodedata.normalize("NFC", path).casefold()
        if key in self._files:
            raise UnsafePath(f"duplicate path {path!r}")
        if key in self._dirs:
            raise UnsafePath(f"path {path!r} is both a file and a directory")
        parts = key.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent in self._files:
                raise UnsafePath(f"path {path!r} is inside {parent!r}, which is a file")
            self._dirs.add(parent)
        self._files.add(key)


def archive_size(files: Sequence[Mapping[str, Any]]) -> int:
    """Size in bytes of the archive that holds ``files`` (entries plus the end marker)."""
    total = 1
    for entry in files:
        total += ENTRY_HEAD.size + len(str(entry["path"]).encode("utf-8")) + ENTRY_SIZE.size + int(entry["size"])
    return total


def chunk_count(payload_size: int) -> int:
    return -(-payload_size // CHUNK_SIZE)


# -- manifest -------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _keys(value: Any, expected: frozenset[str] | set[str], where: str, error: type[TGSPError]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise error(f"manifest: {where} must be an object")
    missing, unknown = sorted(expected - set(value)), sorted(set(value) - expected)
    if missing or unknown:
        raise error(f"manifest: {where} lacks {missing} / has unknown fields {unknown}")
    return value


def _text(value: Any, where: str, error: type[TGSPError], *, optional: bool = False, limit: int = 1024) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not value or len(value) > limit:
        raise error(f"manifest: {where} must be a non-empty string of at most {limit} characters")


def one_line(text: str) -> str:
    """``text`` with every unprintable character escaped: package content must not steer a terminal."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _field(loc: tuple[int | str, ...]) -> str:
    """Where a certificate problem is, on one line whatever names the certificate uses."""
    return ".".join(one_line(str(part)[:64]) for part in loc) or "the certificate"


def parse_certificate(certificate: Any, *, error: type[TGSPError] = MalformedPackage) -> PrivacyCertificate:
    """A privacy certificate as the typed :class:`~tensafe.engine.ledger.PrivacyCertificate`.

    Any JSON object with at least accountant, epsilon, delta and steps, every
    field it states of the right type and range; fields the model does not
    know are kept. Anything else raises ``error`` naming the fields at fault.
    """
    if not isinstance(certificate, dict):
        raise error("privacy certificate must be a JSON object")
    # Canonical JSON first: it refuses NaN, non-JSON values and deep nesting with
    # a TGSP error, and strict JSON validation then refuses true as a step count.
    try:
        data = canonical_json(certificate, error=error, what="privacy certificate")
    except TGSPError as exc:
        raise error(one_line(str(exc))) from None
    try:
        return PrivacyCertificate.model_validate_json(data, strict=True)
    except ValidationError as exc:
        problems = [
            f"{_field(problem['loc'])}: {problem['msg']}"
            for problem in exc.errors(include_url=False, include_input=False)[:MAX_CERTIFICATE_PROBLEMS]
        ]
        more = exc.error_count() - len(problems)
        raise error(
            "privacy certificate: " + "; ".join(problems) + (f" (and {more} more)" if more > 0 else "")
        ) from None


def validate_certificate(certificate: Any, *, error: type[TGSPError] = MalformedPackage) -> dict[str, Any]:
    """Check a privacy certificate (see :func:`parse_certificate`); returns it unchanged."""
    parse_certificate(certificate, error=error)
    checked: dict[str, Any] = certificate
    return checked


def _parse_not_after(value: str) -> dt.datetime:
    """The first instant at which a package with this ``not_after`` is expired."""
    if _DATE.fullmatch(value):
        day = dt.date.fromisoformat(value)
        last, step = dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC), dt.timedelta(days=1)
    elif _CREATED.fullmatch(value):
        last, step = dt.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC), dt.timedelta(seconds=1)
    else:
        raise ValueError(value)
    try:
        return last + step
    except OverflowError:
        return dt.datetime.max.replace(tzinfo=dt.UTC)


def normalize_not_after(value: str | dt.date | dt.datetime) -> str:
    """``YYYY-MM-DD`` (valid through that UTC day) or ``YYYY-MM-DDTHH:MM:SSZ`` (valid through that second)."""
    try:
        if isinstance(value, str):
            if _DATE.fullmatch(value):
                return dt.date.fromisoformat(value).isoformat()
            value = dt.datetime.fromisoformat(value)
        if isinstance(value, dt.datetime):
            if value.tzinfo is None or value.utcoffset() is None:
                raise PackError(f"not_after {value.isoformat()!r} needs a time zone (or give a date)")
            return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        if isinstance(value, dt.date):
            return value.isoformat()
    except ValueError:
        pass
    raise PackError(f"not_after {value!r} is not an ISO date (YYYY-MM-DD) or a date-time with a time zone")


def validate_manifest(manifest: Any, *, error: type[TGSPError] = MalformedPackage) -> dict[str, Any]:
    """Check every field of a version-1 manifest; unsafe file paths raise :class:`UnsafePath`."""
    m = _keys(manifest, MANIFEST_KEYS, "the manifest", error)
    if m["format"] != "TGSP" or m["format_version"] != FORMAT_VERSION or not _is_int(m["format_version"]):
        raise error(f"manifest: not a TGSP version {FORMAT_VERSION} manifest")
    package_id = m["package_id"]
    try:
        if not isinstance(package_id, str) or str(uuid.UUID(package_id)) != package_id:
            raise ValueError(package_id)
    except ValueError:
        raise error("manifest: package_id must be a lower-case UUID") from None
    created = m["created"]
    try:
        if not isinstance(created, str) or not _CREATED.fullmatch(created):
            raise ValueError(created)
        dt.datetime.strptime(created, "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        raise error("manifest: created must be a UTC time YYYY-MM-DDTHH:MM:SSZ") from None
    producer = _keys(m["producer"], {"fingerprint"}, "producer", error)
    if not isinstance(producer["fingerprint"], str) or not _HEX64.fullmatch(producer["fingerprint"]):
        raise error("manifest: producer.fingerprint must be 64 lower-case hex digits")
    base = _keys(m["base_model"], {"id", "sha256", "revision"}, "base_model", error)
    _text(base["id"], "base_model.id", error)
    if base["sha256"] is not None and (not isinstance(base["sha256"], str) or not _HEX64.fullmatch(base["sha256"])):
        raise error("manifest: base_model.sha256 must be null or 64 lower-case hex digits")
    _text(base["revision"], "base_model.revision", error, optional=True)
    if not isinstance(m["lora"], dict):
        raise error("manifest: lora must be an object")

    files = m["files"]
    if not isinstance(files, list) or len(files) > MAX_FILES:
        raise error(f"manifest: files must be a list of at most {MAX_FILES} entries")
    seen = _PathSet()
    previous: str | None = None
    for i, entry in enumerate(files):
        _keys(entry, {"path", "size", "sha256"}, f"files[{i}]", error)
        path = check_path(entry["path"])
        seen.add(path)
        if previous is not None and path <= previous:
            raise error("manifest: files must be sorted by path")
        previous = path
        if not _is_int(entry["size"]) or not 0 <= entry["size"] <= MAX_PAYLOAD_SIZE:
            raise error(f"manifest: files[{i}].size must be an integer in [0, 2**40]")
        if not isinstance(entry["sha256"], str) or not _HEX64.fullmatch(entry["sha256"]):
            raise error(f"manifest: files[{i}].sha256 must be 64 lower-case hex digits")

    payload = _keys(m["payload"], {"aead", "chunk_size", "size", "chunks", "nonce_prefix"}, "payload", error)
    if payload["aead"] != AEAD_NAME or payload["chunk_size"] != CHUNK_SIZE or not _is_int(payload["chunk_size"]):
        raise error(f"manifest: the payload must be {AEAD_NAME} in chunks of {CHUNK_SIZE} bytes")
    size, chunks = payload["size"], payload["chunks"]
    if not _is_int(size) or not 1 <= size <= MAX_PAYLOAD_SIZE or size != archive_size(files):
        raise error("manifest: payload.size does not match the files")
    if not _is_int(chunks) or chunks != chunk_count(size):
        raise error("manifest: payload.chunks does not match payload.size")
    if not isinstance(payload["nonce_prefix"], str) or not _HEX_PREFIX.fullmatch(payload["nonce_prefix"]):
        raise error("manifest: payload.nonce_prefix must be 16 lower-case hex digits")

    recipients = m["recipients"]
    if (
        not isinstance(recipients, list)
        or not 1 <= len(recipients) <= MAX_RECIPIENTS
        or not all(isinstance(r, str) and _HEX64.fullmatch(r) for r in recipients)
        or len(set(recipients)) != len(recipients)
    ):
        raise error(f"manifest: recipients must be 1 to {MAX_RECIPIENTS} distinct key fingerprints")

    if m["privacy_certificate"] is not None:
        validate_certificate(m["privacy_certificate"], error=error)
    if m["policy"] is not None:
        policy = _keys(m["policy"], {"allowed_base_models", "not_after"}, "policy", error)
        allowed = policy["allowed_base_models"]
        if allowed is not None:
            if (
                not isinstance(allowed, list)
                or not 1 <= len(allowed) <= 1024
                or len(set(map(str, allowed))) != len(allowed)
            ):
                raise error("manifest: policy.allowed_base_models must be null or 1 to 1024 distinct names")
            for name in allowed:
                _text(name, "policy.allowed_base_models[]", error)
        not_after = policy["not_after"]
        if not_after is not None:
            try:
                if not isinstance(not_after, str):
                    raise ValueError(not_after)
                _parse_not_after(not_after)
            except (ValueError, OverflowError):
                raise error("manifest: policy.not_after must be YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ") from None
    if m["encrypted_adapter"] is not None and not isinstance(m["encrypted_adapter"], dict):
        raise error("manifest: encrypted_adapter must be null or an object")
    return m


def encode_manifest(manifest: Mapping[str, Any]) -> bytes:
    """The canonical bytes of a manifest (see :mod:`tensafe_tgsp._canonical`)."""
    return canonical_json(dict(manifest), error=PackError, what="manifest")


def decode_manifest(data: bytes) -> dict[str, Any]:
    """Parse and validate manifest bytes, which must be in canonical form."""
    return validate_manifest(load_json(data, error=MalformedPackage, what="manifest", canonical=True))


def check_policy(manifest: Mapping[str, Any], *, now: dt.datetime | None = None, base_model: str | None = None) -> None:
    """Enforce the manifest's signed policy; raises :class:`PolicyViolation`.

    ``not_after``: a date is valid through the end of that UTC day, a time
    through that second. ``allowed_base_models``: the manifest's own base model
    and ``base_model`` (the model the caller will load the adapter onto), when
    given, must be listed. Without that list, ``base_model`` must equal the
    manifest's base model id.
    """
    base_id = manifest["base_model"]["id"]
    policy = manifest.get("policy") or {}
    moment = now or dt.datetime.now(dt.UTC)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    not_after = policy.get("not_after")
    if not_after is not None and moment >= _parse_not_after(not_after):
        raise PolicyViolation(
            f"the package expired: its policy allows use until {not_after} "
            f"(now {moment.astimezone(dt.UTC):%Y-%m-%dT%H:%M:%SZ})"
        )
    allowed = policy.get("allowed_base_models")
    if allowed is not None and base_id not in allowed:
        raise PolicyViolation(f"the package's base model {base_id!r} is not in its allowed_base_models {allowed}")
    permitted = allowed if allowed is not None else [base_id]
    if base_model is not None and base_model not in permitted:
        raise PolicyViolation(f"base model {base_model!r} is not allowed for this package (allowed: {permitted})")


# -- crypto pieces --------------------------------------------------------------


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


# -- reading --------------------------------------------------------------------


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


def _read_exact(handle: BinaryIO, length: int, what: str) -> bytes:
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
def _open_package(path: str | os.PathLike[str]) -> Iterator[tuple[BinaryIO, int]]:
    if not isinstance(path, (str, os.PathLike)):
        raise PackageIOError(f"a package path is a str or os.PathLike, not {type(path).__name__}")
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        raise PackageIOError(f"package not found: {path}") from None
    except OSError as exc:
        raise PackageIOError(f"cannot open package {path}: {exc.strerror or exc}") from None
    except (ValueError, TypeError) as exc:
        raise PackageIOError(f"cannot open package {path!r}: {exc}") from None
    with handle:
        try:
            info = os.fstat(handle.fileno())
        except OSError as exc:
            raise PackageIOError(f"cannot stat package {path}: {exc.strerror or exc}") from None
        if not stat.S_ISREG(info.st_mode):
            raise MalformedPackage(f"{path} is not a regular file")
        yield handle, info.st_size


def _payload_shape(payload_len: int) -> tuple[int, int] | None:
    """(plaintext size, chunks) for a payload of ``payload_len`` ciphertext bytes, or None if impossible."""
    chunks = -(-payload_len // CHUNK_CT_LEN)
    size = payload_len - chunks * TAG_LEN
    if chunks < 1 or chunks > MAX_CHUNKS or size < 1 or size > MAX_PAYLOAD_SIZE or chunk_count(size) != chunks:
        return None
    return size, chunks


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
    if not 1 <= manifest_len <= MAX_MANIFEST_LEN:
        raise MalformedPackage(f"manifest length {manifest_len} is outside 1..{MAX_MANIFEST_LEN}")
    if signature_len != SIGNATURE_BLOCK_LEN:
        raise MalformedPackage(f"signature block length {signature_len} is not {SIGNATURE_BLOCK_LEN}")
    count, extra = divmod(recipients_len - RECIPIENT_COUNT.size, RECIPIENT_ENTRY_LEN)
    if extra or not 1 <= count <= MAX_RECIPIENTS:
        raise MalformedPackage(f"recipient block length {recipients_len} does not hold 1..{MAX_RECIPIENTS} entries")
    if _payload_shape(payload_len) is None:
        raise MalformedPackage(f"payload length {payload_len} is not a valid chunked payload (at most 1 TiB)")
    payload_offset = HEADER_LEN + manifest_len + signature_len + recipients_len
    total = payload_offset + payload_len
    if file_size < total:
        raise TruncatedPackage(f"the package is {file_size} bytes but its header declares {total}")
    if file_size > total:
        raise TrailingData(f"the package is {file_size} bytes but its header declares {total}")
    manifest = _read_exact(handle, manifest_len, "manifest")
    signature_block = _read_exact(handle, signature_len, "signature block")
    recipient_block = _read_exact(handle, recipients_len, "recipient block")
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


def _trusted(trusted_signers: Iterable[SigningPublicKey | str | os.PathLike[str]]) -> dict[bytes, SigningPublicKey]:
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
    """Signatures, trust, manifest, recipient block and policy of a read package; returns the manifest."""
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
    with _open_package(path) as (handle, size):
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
    with _open_package(path) as (handle, size):
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

    Checks the header and lengths, both signatures (Ed25519 and ML-DSA-65) by a
    key in ``trusted_signers`` over the header, manifest and recipient block,
    the manifest's form, the recipient block against the manifest, and the
    policy (see :func:`check_policy`). The payload's integrity is checked by
    :func:`unpack`, which authenticates every chunk as it decrypts it.
    """
    trusted = _trusted(trusted_signers)
    with _open_package(path) as (handle, size):
        return verify_layout(read_layout(handle, size), trusted, now=now, base_model=base_model)


# -- unpacking ------------------------------------------------------------------


class _PayloadReader:
    """Decrypts the payload one authenticated chunk at a time and serves its plaintext."""

    def __init__(self, handle: BinaryIO, content_key: bytes, manifest: Mapping[str, Any], manifest_hash: bytes) -> None:
        self._handle = handle
        self._aead = AESGCM(content_key)
        self._hash = manifest_hash
        self._prefix = bytes.fromhex(manifest["payload"]["nonce_prefix"])
        self._size = int(manifest["payload"]["size"])
        self._chunks = int(manifest["payload"]["chunks"])
        self._buffer = b""
        self._pos = 0
        self._next = 0

    def _load(self) -> bool:
        index = self._next
        if index >= self._chunks:
            return False
        final = index == self._chunks - 1
        plain_len = self._size - CHUNK_SIZE * index if final else CHUNK_SIZE
        ciphertext = _read_exact(self._handle, plain_len + TAG_LEN, f"payload chunk {index}")
        try:
            self._buffer = self._aead.decrypt(
                chunk_nonce(self._prefix, index), ciphertext, chunk_aad(self._hash, index, final)
            )
        except InvalidTag:
            raise IntegrityError(
                f"payload chunk {index} of {self._chunks} failed authentication: the payload was altered, "
                "or chunks were reordered, duplicated, dropped or spliced from another package"
            ) from None
        self._pos = 0
        self._next += 1
        return True

    def read_some(self, limit: int) -> bytes:
        while self._pos >= len(self._buffer):
            if not self._load():
                raise IntegrityError("the archive ends before the entries it declares")
        piece = self._buffer[self._pos : self._pos + limit]
        self._pos += len(piece)
        return piece

    def read(self, length: int) -> bytes:
        parts = []
        while length:
            piece = self.read_some(length)
            parts.append(piece)
            length -= len(piece)
        return b"".join(parts)

    def finish(self) -> None:
        if self._pos != len(self._buffer) or self._next != self._chunks:
            raise IntegrityError("the payload holds data after the archive's end marker")


def _open_new_file(directory: Path, parts: Sequence[str]) -> int:
    """Create ``directory/parts...`` as a new file (mode 0600), making parent directories (0700)."""
    current = directory
    for part in parts[:-1]:
        current = current / part
        try:
            os.mkdir(current, 0o700)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(current).st_mode):
                raise UnsafePath(f"{'/'.join(parts)!r}: a parent is not a directory") from None
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(current / parts[-1], flags, 0o600)
    except FileExistsError:
        raise UnsafePath(f"duplicate path {'/'.join(parts)!r}") from None


def extract_payload(
    handle: BinaryIO, layout: Layout, manifest: Mapping[str, Any], content_key: bytes, directory: Path
) -> list[Path]:
    """Decrypt the payload into ``directory`` (a fresh, empty directory), checking it against the manifest."""
    handle.seek(layout.payload_offset)
    reader = _PayloadReader(handle, content_key, manifest, hashlib.sha256(layout.manifest).digest())
    files = manifest["files"]
    seen = _PathSet()
    written: list[Path] = []
    index = 0
    while True:
        (kind,) = reader.read(1)
        if kind == ENTRY_END:
            break
        if kind != ENTRY_FILE:
            raise UnsafePath(
                f"archive entry {index} has type {kind:#04x}: only regular files are allowed "
                "(links, directories and device files are refused)"
            )
        (length,) = struct.unpack(">H", reader.read(2))
        if not 1 <= length <= MAX_PATH_BYTES:
            raise UnsafePath(f"archive entry {index} has a path of {length} bytes")
        try:
            path = reader.read(length).decode("utf-8", errors="strict")
        except UnicodeDecodeError:
            raise UnsafePath(f"archive entry {index} has a path that is not UTF-8") from None
        check_path(path)
        seen.add(path)
        if index >= len(files) or files[index]["path"] != path:
            raise IntegrityError(f"archive entry {path!r} is not the next file of the signed content index")
        (size,) = ENTRY_SIZE.unpack(reader.read(ENTRY_SIZE.size))
        expected = files[index]
        if size != expected["size"]:
            raise IntegrityError(f"{path}: the archive says {size} bytes, the signed index {expected['size']}")
        digest = hashlib.sha256()
        parts = path.split("/")
        fd = _open_new_file(directory, parts)
        with os.fdopen(fd, "wb") as out:
            remaining = size
            while remaining:
                piece = reader.read_some(min(remaining, CHUNK_SIZE))
                digest.update(piece)
                out.write(piece)
                remaining -= len(piece)
        if digest.hexdigest() != expected["sha256"]:
            raise IntegrityError(f"{path}: SHA-256 differs from the signed content index")
        written.append(Path(*parts))
        index += 1
    if index != len(files):
        raise IntegrityError(f"the archive holds {index} of the {len(files)} files of the signed content index")
    reader.finish()
    return written


def _check_destination(destination: Path) -> None:
    if destination.is_symlink() or (destination.exists() and not destination.is_dir()):
        raise DestinationExists(f"{destination} exists and is not a directory; refusing to replace it")
    if destination.is_dir():
        try:
            with os.scandir(destination) as entries:
                empty = next(entries, None) is None
        except OSError as exc:
            raise PackageIOError(f"cannot read {destination}: {exc.strerror or exc}") from None
        if not empty:
            raise DestinationExists(f"{destination} is not empty; refusing to unpack into it")


def _make_parents(directory: Path) -> list[Path]:
    """Create ``directory`` and missing ancestors; returns those created, deepest first."""
    missing: list[Path] = []
    current = directory
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:
            pass
        except OSError as exc:
            _remove_dirs(missing)
            raise PackageIOError(f"cannot create {path}: {exc.strerror or exc}") from None
    return missing


def _remove_dirs(paths: Iterable[Path]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            path.rmdir()


def _recipient(recipient_key: RecipientKey | str | os.PathLike[str], passphrase: str | bytes | None) -> RecipientKey:
    if isinstance(recipient_key, RecipientKey):
        return recipient_key
    return load_recipient_key(recipient_key, passphrase=passphrase)


@boundary(MalformedPackage, PackageIOError)
def unpack(
    path: str | os.PathLike[str],
    *,
    recipient_key: RecipientKey | str | os.PathLike[str],
    trusted_signers: Iterable[SigningPublicKey | str | os.PathLike[str]],
    destination: str | os.PathLike[str],
    passphrase: str | bytes | None = None,
    base_model: str | None = None,
    now: dt.datetime | None = None,
) -> dict[str, Any]:
    """Verify, then decrypt the package's files into ``destination``; returns the manifest.

    ``destination`` must not exist or be an empty directory. Files are written
    into a fresh temporary directory next to it (mode 0700, files 0600) and
    renamed into place only after every chunk authenticated and every file
    matched its size and SHA-256 in the signed content index; on any error the
    temporary directory is removed and ``destination`` is left untouched.
    """
    trusted = _trusted(trusted_signers)
    key = _recipient(recipient_key, passphrase)
    try:
        target = Path(os.path.abspath(os.fspath(destination)))
        if "\x00" in str(target):
            raise ValueError("embedded null byte")
    except (TypeError, ValueError) as exc:
        raise PackageIOError(f"invalid destination {destination!r}: {exc}") from None
    _check_destination(target)
    with _open_package(path) as (handle, size):
        layout = read_layout(handle, size)
        manifest = verify_layout(layout, trusted, now=now, base_model=base_model)
        mine = key.public_key().fingerprint_bytes
        entries = [e for e in parse_recipient_block(layout.recipient_block) if e[:FINGERPRINT_LEN] == mine]
        if not entries:
            raise NotARecipient(
                f"the package is not encrypted to recipient key {key.fingerprint}; "
                f"its recipients are {', '.join(manifest['recipients'])}"
            )
        manifest_hash = hashlib.sha256(layout.manifest).digest()
        content_key = unwrap_content_key(key, entries[0], manifest_hash, uuid.UUID(manifest["package_id"]).bytes)
        created = _make_parents(target.parent)
        try:
            scratch = Path(tempfile.mkdtemp(prefix=".tgsp-unpack-", dir=target.parent))
        except OSError as exc:
            _remove_dirs(created)
            raise PackageIOError(f"cannot create a directory in {target.parent}: {exc.strerror or exc}") from None
        try:
            extract_payload(handle, layout, manifest, content_key, scratch)
            _check_destination(target)
            os.rename(scratch, target)
        except BaseException as exc:
            shutil.rmtree(scratch, ignore_errors=True)
            _remove_dirs(created)
            if isinstance(exc, OSError):
                raise PackageIOError(f"cannot write {target}: {exc.strerror or exc}") from None
            raise
    return manifest


# -- packing --------------------------------------------------------------------


@dataclass
class _Source:
    path: str
    size: int
    sha256: str
    data: bytes | memoryview | None = None
    file: Path | None = None

    def pieces(self) -> Iterator[bytes | memoryview]:
        if self.data is not None:
            view = memoryview(self.data)
            for start in range(0, len(view), CHUNK_SIZE):
                yield view[start : start + CHUNK_SIZE]
            return
        assert self.file is not None
        with _open_source(self.file) as handle:
            while True:
                piece = handle.read(CHUNK_SIZE)
                if not piece:
                    return
                yield piece


@contextlib.contextmanager
def _open_source(path: Path) -> Iterator[BinaryIO]:
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise PackError(f"cannot read {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise PackError(f"{path} is not a regular file")
        yield handle


def _hash_source(source: _Source) -> _Source:
    digest = hashlib.sha256()
    size = 0
    for piece in source.pieces():
        digest.update(piece)
        size += len(piece)
    source.size, source.sha256 = size, digest.hexdigest()
    return source


def _collect_directory(root: Path) -> list[_Source]:
    if not root.is_dir():
        raise PackError(f"{root} is not a directory")
    sources: list[_Source] = []

    def walk(directory: Path, prefix: str) -> None:
        try:
            with os.scandir(directory) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError as exc:
            raise PackError(f"cannot list {directory}: {exc.strerror or exc}") from None
        for entry in entries:
            rel = f"{prefix}{entry.name}"
            if entry.is_symlink():
                raise PackError(f"{entry.path} is a symbolic link; TGSP packages hold regular files only")
            if entry.is_dir(follow_symlinks=False):
                walk(Path(entry.path), rel + "/")
            elif entry.is_file(follow_symlinks=False):
                sources.append(_Source(check_path(rel), 0, "", file=Path(entry.path)))
            else:
                raise PackError(f"{entry.path} is not a regular file")
            if len(sources) > MAX_FILES:
                raise PackError(f"more than {MAX_FILES} files")

    walk(root, "")
    return sources


def _collect(source: Mapping[str, bytes] | str | os.PathLike[str]) -> list[_Source]:
    if isinstance(source, Mapping):
        if len(source) > MAX_FILES:
            raise PackError(f"more than {MAX_FILES} files")
        sources = []
        for name, data in source.items():
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise PackError(f"{name!r}: file contents must be bytes")
            sources.append(_Source(check_path(name), 0, "", data=bytes(data)))
    else:
        sources = _collect_directory(Path(source))
    sources.sort(key=lambda s: s.path)
    seen = _PathSet()
    for item in sources:
        seen.add(item.path)
    return [_hash_source(item) for item in sources]


def _archive(sources: Sequence[_Source]) -> Iterator[bytes | memoryview]:
    """The archive's plaintext, streamed; each file is re-hashed and must not have changed since indexing."""
    for source in sources:
        encoded = source.path.encode("utf-8")
        yield ENTRY_HEAD.pack(ENTRY_FILE, len(encoded)) + encoded + ENTRY_SIZE.pack(source.size)
        digest = hashlib.sha256()
        size = 0
        for piece in source.pieces():
            size += len(piece)
            if size > source.size:
                break
            digest.update(piece)
            yield piece
        if size != source.size or digest.hexdigest() != source.sha256:
            raise PackError(f"{source.path} changed while it was being packed")
    yield bytes([ENTRY_END])


def _chunks(pieces: Iterable[bytes | memoryview]) -> Iterator[bytes]:
    buffer = bytearray()
    for piece in pieces:
        buffer += piece
        while len(buffer) >= CHUNK_SIZE:
            yield bytes(buffer[:CHUNK_SIZE])
            del buffer[:CHUNK_SIZE]
    if buffer:
        yield bytes(buffer)


def _signing_key(signing_key: SigningKey | str | os.PathLike[str], passphrase: str | bytes | None) -> SigningKey:
    if isinstance(signing_key, SigningKey):
        return signing_key
    return load_signing_key(signing_key, passphrase=passphrase)


def _recipient_keys(
    recipients: Iterable[RecipientPublicKey | str | os.PathLike[str]] | RecipientPublicKey,
) -> list[RecipientPublicKey]:
    if isinstance(recipients, (str, os.PathLike, RecipientPublicKey)):
        recipients = [recipients]
    keys = [r if isinstance(r, RecipientPublicKey) else load_recipient_public_key(r) for r in recipients]
    if not 1 <= len(keys) <= MAX_RECIPIENTS:
        raise PackError(f"a package needs 1 to {MAX_RECIPIENTS} recipients, got {len(keys)}")
    if len({k.fingerprint for k in keys}) != len(keys):
        raise PackError("a recipient is listed twice")
    return keys


@boundary(PackError, PackageIOError)
def write_package(
    output: str | os.PathLike[str],
    *,
    manifest: Mapping[str, Any],
    plaintext: Iterable[bytes | memoryview],
    signing_key: SigningKey,
    recipients: Sequence[RecipientPublicKey],
    overwrite: bool = False,
) -> None:
    """Low level: sign ``manifest`` as given and encrypt the archive ``plaintext`` into a package at ``output``.

    It checks neither the manifest nor the archive (that is :func:`pack`'s job)
    beyond what the byte layout needs: the manifest's ``package_id``,
    ``recipients`` and ``payload`` must describe ``plaintext``. The package is
    written to a temporary file next to ``output`` and renamed into place, so a
    failure never leaves a partial package.
    """
    manifest_bytes = encode_manifest(manifest)
    if len(manifest_bytes) > MAX_MANIFEST_LEN:
        raise PackError(f"the manifest is {len(manifest_bytes)} bytes; at most {MAX_MANIFEST_LEN} are allowed")
    payload = manifest["payload"]
    size, chunks = int(payload["size"]), int(payload["chunks"])
    prefix = bytes.fromhex(payload["nonce_prefix"])
    if len(prefix) != NONCE_PREFIX_LEN or chunks != chunk_count(size) or not 1 <= size <= MAX_PAYLOAD_SIZE:
        raise PackError("the manifest's payload description is inconsistent")
    manifest_hash = hashlib.sha256(manifest_bytes).digest()
    package_id = uuid.UUID(manifest["package_id"]).bytes
    content_key = AESGCM.generate_key(bit_length=256)
    recipient_block = RECIPIENT_COUNT.pack(len(recipients)) + b"".join(
        wrap_content_key(r, content_key, manifest_hash, package_id) for r in recipients
    )
    header = HEADER.pack(
        MAGIC,
        FORMAT_VERSION,
        0,
        len(manifest_bytes),
        SIGNATURE_BLOCK_LEN,
        len(recipient_block),
        size + chunks * TAG_LEN,
    )
    public = signing_key.public_key()
    message = signed_message(header, manifest_bytes, recipient_block, public.fingerprint_bytes)
    ed_signature, ml_signature = signing_key.sign(message, MLDSA_CONTEXT)
    signature_block = public.raw + ed_signature + ml_signature
    assert len(signature_block) == SIGNATURE_BLOCK_LEN

    target = Path(output)
    if target.exists() and not overwrite:
        raise DestinationExists(f"{target} already exists; refusing to overwrite it")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, scratch_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    except OSError as exc:
        raise PackageIOError(f"cannot write in {target.parent}: {exc.strerror or exc}") from None
    scratch = Path(scratch_name)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(header + manifest_bytes + signature_block + recipient_block)
            aead = AESGCM(content_key)
            count = 0
            for index, chunk in enumerate(_chunks(plaintext)):
                expected = min(CHUNK_SIZE, size - index * CHUNK_SIZE) if index < chunks else 0
                if len(chunk) != expected:
                    raise PackError("the archive differs in size from the manifest's payload.size")
                final = index == chunks - 1
                out.write(aead.encrypt(chunk_nonce(prefix, index), chunk, chunk_aad(manifest_hash, index, final)))
                count += 1
            if count != chunks:
                raise PackError("the archive differs in size from the manifest's payload.size")
            out.flush()
            os.fchmod(out.fileno(), 0o644)
            os.fsync(out.fileno())
        if overwrite:
            os.replace(scratch, target)
        else:
            try:
                os.link(scratch, target)  # fails rather than replace a file created meanwhile
            except FileExistsError:
                raise DestinationExists(f"{target} already exists; refusing to overwrite it") from None
            except OSError:
                if target.exists():
                    raise DestinationExists(f"{target} already exists; refusing to overwrite it") from None
                os.replace(scratch, target)
            scratch.unlink(missing_ok=True)
    except BaseException as exc:
        scratch.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise PackageIOError(f"cannot write {target}: {exc.strerror or exc}") from None
        raise


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@boundary(PackError, PackageIOError)
def pack(
    source: Mapping[str, bytes] | str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    signing_key: SigningKey | str | os.PathLike[str],
    recipients: Iterable[RecipientPublicKey | str | os.PathLike[str]] | RecipientPublicKey,
    base_model: str,
    base_model_sha256: str | None = None,
    base_model_revision: str | None = None,
    lora_config: Mapping[str, Any] | None = None,
    privacy_certificate: Mapping[str, Any] | None = None,
    allowed_base_models: Sequence[str] | None = None,
    not_after: str | dt.date | dt.datetime | None = None,
    encrypted_adapter: Mapping[str, Any] | None = None,
    passphrase: str | bytes | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Package adapter files (a ``{path: bytes}`` mapping or a directory) into a signed, encrypted TGSP file.

    Files are read twice, in 64 KiB pieces (once to index and hash them, once
    to encrypt them), so memory does not grow with their size; a file that
    changes in between fails the pack. Returns the manifest that was signed.
    """
    key = _signing_key(signing_key, passphrase)
    recipient_keys = _recipient_keys(recipients)
    sources = _collect(source)
    files = [{"path": s.path, "size": s.size, "sha256": s.sha256} for s in sources]
    size = archive_size(files)
    if size > MAX_PAYLOAD_SIZE:
        raise PackError("the files are larger than the 1 TiB a package may hold")
    policy = None
    if allowed_base_models is not None or not_after is not None:
        if isinstance(allowed_base_models, str):
            raise PackError("allowed_base_models is a list of base model ids, not one string")
        allowed = None if allowed_base_models is None else list(allowed_base_models)
        policy = {
            "allowed_base_models": allowed,
            "not_after": None if not_after is None else normalize_not_after(not_after),
        }
    manifest: dict[str, Any] = {
        "format": "TGSP",
        "format_version": FORMAT_VERSION,
        "package_id": str(uuid.uuid4()),
        "created": utc_now(),
        "producer": {"fingerprint": key.fingerprint},
        "base_model": {
            "id": base_model,
            "sha256": base_model_sha256.lower() if isinstance(base_model_sha256, str) else base_model_sha256,
            "revision": base_model_revision,
        },
        "lora": dict(lora_config or {}),
        "files": files,
        "payload": {
            "aead": AEAD_NAME,
            "chunk_size": CHUNK_SIZE,
            "size": size,
            "chunks": chunk_count(size),
            "nonce_prefix": os.urandom(NONCE_PREFIX_LEN).hex(),
        },
        "recipients": [r.fingerprint for r in recipient_keys],
        "privacy_certificate": None if privacy_certificate is None else dict(privacy_certificate),
        "policy": policy,
        "encrypted_adapter": None if encrypted_adapter is None else dict(encrypted_adapter),
    }
    # Round-trip through the canonical encoding so the manifest checked is exactly the one signed.
    manifest = load_json(encode_manifest(manifest), error=PackError, what="manifest")
    validate_manifest(manifest, error=PackError)
    write_package(
        output,
        manifest=manifest,
        plaintext=_archive(sources),
        signing_key=key,
        recipients=recipient_keys,
        overwrite=overwrite,
    )
    return manifest
