"""Unpacking: verify, unwrap the content key, decrypt and check every chunk and file, rename into place."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import stat
import struct
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tensafe_tgsp._boundary import boundary
from tensafe_tgsp.errors import (
    DestinationExists,
    IntegrityError,
    MalformedPackage,
    NotARecipient,
    PackageIOError,
    UnsafePath,
)
from tensafe_tgsp.format.crypto import chunk_aad, chunk_nonce, unwrap_content_key
from tensafe_tgsp.format.paths import PathSet, check_path
from tensafe_tgsp.format.reader import (
    Layout,
    open_package,
    parse_recipient_block,
    read_exact,
    read_layout,
    trusted_keys,
    verify_layout,
)
from tensafe_tgsp.format.spec import (
    CHUNK_SIZE,
    ENTRY_END,
    ENTRY_FILE,
    ENTRY_SIZE,
    FINGERPRINT_LEN,
    MAX_PATH_BYTES,
    TAG_LEN,
)
from tensafe_tgsp.format.staging import remove_stale_staging, staging_directory
from tensafe_tgsp.keys import RecipientKey, SigningPublicKey, load_recipient_key


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
        ciphertext = read_exact(self._handle, plain_len + TAG_LEN, f"payload chunk {index}")
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
    seen = PathSet()
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


def _destination(destination: str | os.PathLike[str]) -> Path:
    try:
        target = Path(os.path.abspath(os.fspath(destination)))
        if "\x00" in str(target):
            raise ValueError("embedded null byte")
    except (TypeError, ValueError) as exc:
        raise PackageIOError(f"invalid destination {destination!r}: {exc}") from None
    return target


def _recipient(recipient_key: RecipientKey | str | os.PathLike[str], passphrase: str | bytes | None) -> RecipientKey:
    if isinstance(recipient_key, RecipientKey):
        return recipient_key
    return load_recipient_key(recipient_key, passphrase=passphrase)


def _content_key(key: RecipientKey, layout: Layout, manifest: Mapping[str, Any]) -> bytes:
    """The package's content key, unwrapped from ``key``'s recipient entry."""
    mine = key.public_key().fingerprint_bytes
    entries = [e for e in parse_recipient_block(layout.recipient_block) if e[:FINGERPRINT_LEN] == mine]
    if not entries:
        raise NotARecipient(
            f"the package is not encrypted to recipient key {key.fingerprint}; "
            f"its recipients are {', '.join(manifest['recipients'])}"
        )
    manifest_hash = hashlib.sha256(layout.manifest).digest()
    return unwrap_content_key(key, entries[0], manifest_hash, uuid.UUID(manifest["package_id"]).bytes)


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
    into a fresh staging directory next to it (mode 0700, files 0600) and
    renamed into place only after every chunk authenticated and every file
    matched its size and SHA-256 in the signed content index; on any error the
    staging directory is removed and ``destination`` is left untouched. Staging
    directories that killed unpacks left in the same parent are removed first
    (see :mod:`tensafe_tgsp.format.staging`).
    """
    trusted = trusted_keys(trusted_signers)
    key = _recipient(recipient_key, passphrase)
    target = _destination(destination)
    _check_destination(target)
    remove_stale_staging(target.parent)
    with open_package(path) as (handle, size):
        layout = read_layout(handle, size)
        manifest = verify_layout(layout, trusted, now=now, base_model=base_model)
        content_key = _content_key(key, layout, manifest)
        with staging_directory(target) as scratch:
            extract_payload(handle, layout, manifest, content_key, scratch)
            _check_destination(target)
            os.rename(scratch, target)
    return manifest
