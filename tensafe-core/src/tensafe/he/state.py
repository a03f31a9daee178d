"""The key owner's secret state at rest: scrypt and AES-256-GCM under a passphrase, file mode 0600.

The state holds the CKKS secret key and the plaintext B matrices, so it is never
written in the clear. A sealed state is one byte string::

    SEALED_MAGIC | u32 header length | JSON header | AES-256-GCM ciphertext

The header names the KDF (scrypt, its salt and cost) and the cipher's nonce; it
is the ciphertext's associated data, so any change to it fails authentication.
The passphrase comes from an environment variable (:data:`PASSPHRASE_ENV` by
default, or one named with ``--passphrase-env``), as TGSP private keys take theirs.

A state an earlier TenSafe wrote unencrypted is refused, with the command that
re-encrypts it (``tensafe he seal-state``): reading it would keep a secret key
in the clear on disk with nothing but a warning to show for it.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import struct
from pathlib import Path
from typing import Any

from tensafe.errors import MissingDependencyError, UsageError

#: Environment variable holding the key owner's passphrase unless another is named.
PASSPHRASE_ENV = "TENSAFE_HE_PASSPHRASE"
SEALED_MAGIC = b"TSHE-LORA-OWNER-SEALED\x01"
#: How a state written unencrypted by TenSafe 0.2 starts.
PLAIN_MAGIC = b"TSHE-LORA-OWNER\x01"
HEADER_LENGTH = struct.Struct(">I")
MAX_HEADER = 4096
#: scrypt cost for new states (128 MiB, about half a second); reading accepts at most 256 MiB.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**17, 8, 1
SCRYPT_MAX_MEMORY = 256 * 1024 * 1024
SALT_LEN, NONCE_LEN = 16, 12
RESEAL_HINT = "tensafe he seal-state OLD NEW --passphrase-env VAR"


class KeyOwnerStateError(UsageError):
    """A key owner state that cannot be opened: wrong passphrase, altered, unencrypted or malformed."""

    code = "he_key_owner_state"


def _crypto() -> tuple[Any, Any, Any]:
    try:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
    except ImportError:
        raise MissingDependencyError(
            "sealing the HE key owner's state needs cryptography: pip install tensafe-he-seal (or cryptography)"
        ) from None
    return AESGCM, Scrypt, InvalidTag


def _key(passphrase: str | bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    _, scrypt, _ = _crypto()
    secret = passphrase.encode("utf-8") if isinstance(passphrase, str) else bytes(passphrase)
    if not secret:
        raise KeyOwnerStateError("the key owner's passphrase is empty")
    try:
        key: bytes = scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(secret)
    except (ValueError, MemoryError) as exc:
        raise KeyOwnerStateError(f"cannot derive the key owner state's key: {exc}") from None
    return key


def seal(state: bytes, passphrase: str | bytes) -> bytes:
    """``state`` encrypted under a key derived from ``passphrase``."""
    aesgcm, _, _ = _crypto()
    salt, nonce = os.urandom(SALT_LEN), os.urandom(NONCE_LEN)
    header = {
        "kdf": {"name": "scrypt", "salt": base64.b64encode(salt).decode(), "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P},
        "cipher": "AES-256-GCM",
        "nonce": base64.b64encode(nonce).decode(),
    }
    head = SEALED_MAGIC + _header_bytes(header)
    sealed: bytes = aesgcm(_key(passphrase, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)).encrypt(nonce, state, head)
    return head + sealed


def _header_bytes(header: dict[str, Any]) -> bytes:
    body = json.dumps(header, sort_keys=True).encode()
    return HEADER_LENGTH.pack(len(body)) + body


def is_unencrypted(data: bytes) -> bool:
    """Whether ``data`` is a key owner state written in the clear by an earlier TenSafe."""
    return bytes(data[: len(PLAIN_MAGIC)]) == PLAIN_MAGIC


def unseal(data: bytes, passphrase: str | bytes | None, what: str = "the key owner state") -> bytes:
    """The state inside a sealed ``data``; a clear :class:`KeyOwnerStateError` for anything else."""
    aesgcm, _, invalid_tag = _crypto()
    data = bytes(data)
    if is_unencrypted(data):
        raise KeyOwnerStateError(
            f"{what} was written unencrypted by an earlier TenSafe and is refused; re-encrypt it with "
            f"`{RESEAL_HINT}`, then delete the unencrypted file"
        )
    if not data.startswith(SEALED_MAGIC):
        raise KeyOwnerStateError(f"{what} is not a sealed HE-LoRA key owner state")
    if passphrase is None:
        raise KeyOwnerStateError(f"{what} is passphrase-protected: set {PASSPHRASE_ENV} (or --passphrase-env VAR)")
    offset = len(SEALED_MAGIC)
    try:
        (length,) = HEADER_LENGTH.unpack_from(data, offset)
        if length > MAX_HEADER:
            raise ValueError("header too long")
        header = json.loads(data[offset + HEADER_LENGTH.size : offset + HEADER_LENGTH.size + length])
        kdf = header["kdf"]
        n, r, p = (kdf[k] for k in ("n", "r", "p"))
        if kdf["name"] != "scrypt" or header["cipher"] != "AES-256-GCM":
            raise ValueError("unsupported KDF or cipher")
        if not all(type(v) is int for v in (n, r, p)):
            raise ValueError("scrypt costs must be integers")
        if n < 2**14 or n & (n - 1) or not 1 <= r <= 32 or not 1 <= p <= 4 or 128 * n * r > SCRYPT_MAX_MEMORY:
            raise ValueError("scrypt costs out of the accepted range")
        salt = base64.b64decode(kdf["salt"], validate=True)
        nonce = base64.b64decode(header["nonce"], validate=True)
        if len(salt) != SALT_LEN or len(nonce) != NONCE_LEN:
            raise ValueError("salt or nonce of the wrong length")
    except (struct.error, ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise KeyOwnerStateError(f"{what} is malformed: {exc}") from None
    end = offset + HEADER_LENGTH.size + length
    try:
        state: bytes = aesgcm(_key(passphrase, salt, n, r, p)).decrypt(nonce, data[end:], data[:end])
    except invalid_tag:
        raise KeyOwnerStateError(f"{what}: wrong passphrase, or the file was altered") from None
    return state


def passphrase_from_env(env_var: str | None = None) -> str | None:
    """The passphrase in ``$env_var`` (default :data:`PASSPHRASE_ENV`); None when that is unset.

    A variable named explicitly must be set and non-empty.
    """
    name = env_var or PASSPHRASE_ENV
    value = os.environ.get(name)
    if env_var and not value:
        raise KeyOwnerStateError(f"environment variable {env_var} (from --passphrase-env) is not set or empty")
    return value or None


def write_new(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file with mode 0600; refuse to replace an existing file."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise KeyOwnerStateError(f"{path} already exists; refusing to overwrite it") from None
    except OSError as exc:
        raise KeyOwnerStateError(f"cannot create {path}: {exc.strerror or exc}") from None
    try:
        os.fchmod(fd, 0o600)  # independent of the umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise KeyOwnerStateError(f"cannot write {path}: {exc.strerror or exc}") from None
    os.close(fd)


def replace(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (mode 0600): written beside it, fsynced, renamed over it.

    A crash leaves either the old file or the new one, never a torn state.
    """
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.unlink(missing_ok=True)
    write_new(partial, data)
    try:
        os.replace(partial, path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise KeyOwnerStateError(f"cannot replace {path}: {exc.strerror or exc}") from None
