"""Packing: index and hash the files, sign the manifest, wrap the content key, encrypt the archive."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tensafe_tgsp._boundary import boundary
from tensafe_tgsp._canonical import load_json
from tensafe_tgsp._regular_file import open_regular_file
from tensafe_tgsp.errors import DestinationExists, PackageIOError, PackError
from tensafe_tgsp.format.crypto import chunk_aad, chunk_nonce, signed_message, wrap_content_key
from tensafe_tgsp.format.manifest import encode_manifest, validate_manifest
from tensafe_tgsp.format.paths import PathSet, check_path
from tensafe_tgsp.format.policy import normalize_not_after
from tensafe_tgsp.format.spec import (
    AEAD_NAME,
    CHUNK_SIZE,
    ENTRY_END,
    ENTRY_FILE,
    ENTRY_HEAD,
    ENTRY_SIZE,
    FORMAT_VERSION,
    HEADER,
    MAGIC,
    MAX_FILES,
    MAX_MANIFEST_LEN,
    MAX_PAYLOAD_SIZE,
    MAX_RECIPIENTS,
    MLDSA_CONTEXT,
    NONCE_PREFIX_LEN,
    RECIPIENT_COUNT,
    SIGNATURE_BLOCK_LEN,
    TAG_LEN,
    archive_size,
    chunk_count,
)
from tensafe_tgsp.keys import (
    RecipientPublicKey,
    SigningKey,
    load_recipient_public_key,
    load_signing_key,
)


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
    try:
        fd, _ = open_regular_file(path, what="file", error=PackError, follow_symlinks=False)
    except OSError as exc:
        raise PackError(f"cannot read {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as handle:
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
    seen = PathSet()
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


def _payload_description(payload: Mapping[str, Any]) -> tuple[int, int, bytes]:
    """(archive size, chunk count, nonce prefix) from the manifest's ``payload``, which must agree."""
    size, chunks = int(payload["size"]), int(payload["chunks"])
    prefix = bytes.fromhex(payload["nonce_prefix"])
    if len(prefix) != NONCE_PREFIX_LEN or chunks != chunk_count(size) or not 1 <= size <= MAX_PAYLOAD_SIZE:
        raise PackError("the manifest's payload description is inconsistent")
    return size, chunks, prefix


def _signature_block(signing_key: SigningKey, header: bytes, manifest: bytes, recipient_block: bytes) -> bytes:
    public = signing_key.public_key()
    message = signed_message(header, manifest, recipient_block, public.fingerprint_bytes)
    ed_signature, ml_signature = signing_key.sign(message, MLDSA_CONTEXT)
    signature_block = public.raw + ed_signature + ml_signature
    assert len(signature_block) == SIGNATURE_BLOCK_LEN
    return signature_block


def _encrypt_payload(
    out: BinaryIO,
    plaintext: Iterable[bytes | memoryview],
    *,
    content_key: bytes,
    prefix: bytes,
    manifest_hash: bytes,
    size: int,
    chunks: int,
) -> None:
    """Encrypt the archive chunk by chunk into ``out``; it must be exactly ``size`` bytes."""
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


def _scratch_file(target: Path) -> tuple[int, Path]:
    """A new temporary file next to ``target`` (making its directory), to be renamed onto it."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, scratch_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    except OSError as exc:
        raise PackageIOError(f"cannot write in {target.parent}: {exc.strerror or exc}") from None
    return fd, Path(scratch_name)


def _move_into_place(scratch: Path, target: Path, *, overwrite: bool) -> None:
    if overwrite:
        os.replace(scratch, target)
        return
    try:
        os.link(scratch, target)  # fails rather than replace a file created meanwhile
    except FileExistsError:
        raise DestinationExists(f"{target} already exists; refusing to overwrite it") from None
    except OSError:
        if target.exists():
            raise DestinationExists(f"{target} already exists; refusing to overwrite it") from None
        os.replace(scratch, target)
    scratch.unlink(missing_ok=True)


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
    size, chunks, prefix = _payload_description(manifest["payload"])
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
    signature_block = _signature_block(signing_key, header, manifest_bytes, recipient_block)

    target = Path(output)
    if target.exists() and not overwrite:
        raise DestinationExists(f"{target} already exists; refusing to overwrite it")
    fd, scratch = _scratch_file(target)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(header + manifest_bytes + signature_block + recipient_block)
            _encrypt_payload(
                out,
                plaintext,
                content_key=content_key,
                prefix=prefix,
                manifest_hash=manifest_hash,
                size=size,
                chunks=chunks,
            )
            out.flush()
            os.fchmod(out.fileno(), 0o644)
            os.fsync(out.fileno())
        _move_into_place(scratch, target, overwrite=overwrite)
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
