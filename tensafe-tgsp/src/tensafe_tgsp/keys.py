"""TGSP keys: hybrid signing keys (Ed25519 + ML-DSA-65) and recipient keys (X25519 + ML-KEM-768).

Both halves of a pair are always used together: a package is valid only when
both signatures verify, and a content key is unwrapped only with both shared
secrets. Key files are JSON (see SPEC.md, "Key files"):

* public keys: ``{"kind", "version", <algorithm>: base64, ..., "fingerprint"}``;
* private keys: the raw private keys / seeds, written with mode 0600 and never
  over an existing file, optionally encrypted as a whole under a key derived
  from a passphrase with scrypt, with AES-256-GCM.

A key's fingerprint is the hex SHA-256 of a domain string followed by both
public keys (fixed lengths, so the encoding is unambiguous).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.mldsa import MLDSA65PrivateKey, MLDSA65PublicKey
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey, MLKEM768PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from tensafe_tgsp._boundary import boundary
from tensafe_tgsp._canonical import canonical_json, load_json
from tensafe_tgsp._regular_file import open_regular_file
from tensafe_tgsp.errors import DestinationExists, KeyFileError, SignatureInvalid

ED25519_PUBLIC_LEN = 32
ED25519_SIGNATURE_LEN = 64
MLDSA65_PUBLIC_LEN = 1952
MLDSA65_SIGNATURE_LEN = 3309
X25519_PUBLIC_LEN = 32
MLKEM768_PUBLIC_LEN = 1184
MLKEM768_CIPHERTEXT_LEN = 1088
PRIVATE_LENS = {"ed25519": 32, "ml_dsa_65": 32, "x25519": 32, "ml_kem_768": 64}

SIGNING_PUBLIC = "tgsp-signing-public-key"
SIGNING_PRIVATE = "tgsp-signing-private-key"
RECIPIENT_PUBLIC = "tgsp-recipient-public-key"
RECIPIENT_PRIVATE = "tgsp-recipient-private-key"
KEY_FILE_VERSION = 1
MAX_KEY_FILE = 64 * 1024

SIGNING_FINGERPRINT_DOMAIN = b"TGSP-v1 signing key\x00"
RECIPIENT_FINGERPRINT_DOMAIN = b"TGSP-v1 recipient key\x00"

#: scrypt cost for new passphrase-protected key files (128 MiB, about half a second).
SCRYPT_N = 2**17
SCRYPT_R = 8
SCRYPT_P = 1
#: Accepted when reading: memory 128 * n * r at most 256 MiB, so a key file cannot exhaust memory.
SCRYPT_MAX_MEMORY = 256 * 1024 * 1024
SALT_LEN = 16
NONCE_LEN = 12

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: Any, length: int, what: str) -> bytes:
    if not isinstance(value, str):
        raise KeyFileError(f"{what}: expected a base64 string")
    try:
        data = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeError, ValueError):
        raise KeyFileError(f"{what}: not valid base64") from None
    if len(data) != length:
        raise KeyFileError(f"{what}: expected {length} bytes, got {len(data)}")
    return data


def _raw_public(key: Ed25519PublicKey | X25519PublicKey | MLDSA65PublicKey | MLKEM768PublicKey) -> bytes:
    return key.public_bytes_raw()


class SigningPublicKey:
    """A producer's public signing key: Ed25519 and ML-DSA-65."""

    __slots__ = ("_ed25519_raw", "_fingerprint", "_mldsa_raw", "ed25519", "ml_dsa")

    def __init__(self, ed25519: Ed25519PublicKey, ml_dsa: MLDSA65PublicKey) -> None:
        self.ed25519 = ed25519
        self.ml_dsa = ml_dsa
        self._ed25519_raw = _raw_public(ed25519)
        self._mldsa_raw = _raw_public(ml_dsa)
        self._fingerprint = hashlib.sha256(SIGNING_FINGERPRINT_DOMAIN + self.raw).digest()

    @classmethod
    def from_raw(cls, ed25519: bytes, ml_dsa: bytes) -> SigningPublicKey:
        """From raw public key bytes; raises :class:`ValueError` on a wrong length or encoding."""
        if len(ed25519) != ED25519_PUBLIC_LEN or len(ml_dsa) != MLDSA65_PUBLIC_LEN:
            raise ValueError("wrong public key length")
        return cls(Ed25519PublicKey.from_public_bytes(ed25519), MLDSA65PublicKey.from_public_bytes(ml_dsa))

    @property
    def raw(self) -> bytes:
        """Ed25519 public key (32 bytes) followed by ML-DSA-65 public key (1952 bytes)."""
        return self._ed25519_raw + self._mldsa_raw

    @property
    def fingerprint_bytes(self) -> bytes:
        return self._fingerprint

    @property
    def fingerprint(self) -> str:
        return self._fingerprint.hex()

    def verify(self, ed25519_signature: bytes, ml_dsa_signature: bytes, message: bytes, context: bytes) -> None:
        """Raise :class:`SignatureInvalid` unless BOTH signatures verify over ``message``."""
        try:
            self.ed25519.verify(ed25519_signature, message)
        except (InvalidSignature, ValueError):
            raise SignatureInvalid("the Ed25519 signature does not verify") from None
        try:
            self.ml_dsa.verify(ml_dsa_signature, message, context)
        except (InvalidSignature, ValueError):
            raise SignatureInvalid("the ML-DSA-65 signature does not verify") from None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SigningPublicKey) and other.raw == self.raw

    def __hash__(self) -> int:
        return hash(self._fingerprint)

    def __repr__(self) -> str:
        return f"SigningPublicKey({self.fingerprint})"


class SigningKey:
    """A producer's private signing key: Ed25519 and ML-DSA-65."""

    __slots__ = ("_public", "ed25519", "ml_dsa")

    def __init__(self, ed25519: Ed25519PrivateKey, ml_dsa: MLDSA65PrivateKey) -> None:
        self.ed25519 = ed25519
        self.ml_dsa = ml_dsa
        self._public = SigningPublicKey(ed25519.public_key(), ml_dsa.public_key())

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate(), MLDSA65PrivateKey.generate())

    def public_key(self) -> SigningPublicKey:
        return self._public

    @property
    def fingerprint(self) -> str:
        return self._public.fingerprint

    def sign(self, message: bytes, context: bytes) -> tuple[bytes, bytes]:
        """(Ed25519 signature, ML-DSA-65 signature with ``context``) over ``message``."""
        return self.ed25519.sign(message), self.ml_dsa.sign(message, context)

    def _secret_fields(self) -> dict[str, str]:
        return {"ed25519": _b64(self.ed25519.private_bytes_raw()), "ml_dsa_65": _b64(self.ml_dsa.private_bytes_raw())}

    def __repr__(self) -> str:
        return f"SigningKey({self.fingerprint})"


class RecipientPublicKey:
    """A recipient's public key: X25519 and ML-KEM-768."""

    __slots__ = ("_fingerprint", "_mlkem_raw", "_x25519_raw", "ml_kem", "x25519")

    def __init__(self, x25519: X25519PublicKey, ml_kem: MLKEM768PublicKey) -> None:
        self.x25519 = x25519
        self.ml_kem = ml_kem
        self._x25519_raw = _raw_public(x25519)
        self._mlkem_raw = _raw_public(ml_kem)
        self._fingerprint = hashlib.sha256(RECIPIENT_FINGERPRINT_DOMAIN + self.raw).digest()

    @classmethod
    def from_raw(cls, x25519: bytes, ml_kem: bytes) -> RecipientPublicKey:
        if len(x25519) != X25519_PUBLIC_LEN or len(ml_kem) != MLKEM768_PUBLIC_LEN:
            raise ValueError("wrong public key length")
        return cls(X25519PublicKey.from_public_bytes(x25519), MLKEM768PublicKey.from_public_bytes(ml_kem))

    @property
    def raw(self) -> bytes:
        """X25519 public key (32 bytes) followed by ML-KEM-768 public key (1184 bytes)."""
        return self._x25519_raw + self._mlkem_raw

    @property
    def x25519_raw(self) -> bytes:
        return self._x25519_raw

    @property
    def fingerprint_bytes(self) -> bytes:
        return self._fingerprint

    @property
    def fingerprint(self) -> str:
        return self._fingerprint.hex()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RecipientPublicKey) and other.raw == self.raw

    def __hash__(self) -> int:
        return hash(self._fingerprint)

    def __repr__(self) -> str:
        return f"RecipientPublicKey({self.fingerprint})"


class RecipientKey:
    """A recipient's private key: X25519 and ML-KEM-768."""

    __slots__ = ("_public", "ml_kem", "x25519")

    def __init__(self, x25519: X25519PrivateKey, ml_kem: MLKEM768PrivateKey) -> None:
        self.x25519 = x25519
        self.ml_kem = ml_kem
        self._public = RecipientPublicKey(x25519.public_key(), ml_kem.public_key())

    @classmethod
    def generate(cls) -> RecipientKey:
        return cls(X25519PrivateKey.generate(), MLKEM768PrivateKey.generate())

    def public_key(self) -> RecipientPublicKey:
        return self._public

    @property
    def fingerprint(self) -> str:
        return self._public.fingerprint

    def _secret_fields(self) -> dict[str, str]:
        return {"x25519": _b64(self.x25519.private_bytes_raw()), "ml_kem_768": _b64(self.ml_kem.private_bytes_raw())}

    def __repr__(self) -> str:
        return f"RecipientKey({self.fingerprint})"


# -- files ----------------------------------------------------------------------


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Write a new file with ``mode``; refuse to replace anything that exists (or a dangling link)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        raise DestinationExists(f"{path} already exists; refusing to overwrite it") from None
    except OSError as exc:
        raise KeyFileError(f"cannot create {path}: {exc.strerror or exc}") from None
    try:
        os.fchmod(fd, mode)  # independent of the umask
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise KeyFileError(f"cannot write {path}: {exc.strerror or exc}") from None
    os.close(fd)


def _passphrase_bytes(passphrase: str | bytes) -> bytes:
    data = passphrase.encode("utf-8") if isinstance(passphrase, str) else bytes(passphrase)
    if not data:
        raise KeyFileError("the passphrase is empty")
    return data


def _scrypt(passphrase: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    try:
        return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase)
    except (ValueError, MemoryError) as exc:
        raise KeyFileError(f"cannot derive the key-file key: {exc}") from None


def _private_document(
    kind: str, fingerprint: str, secret: Mapping[str, str], passphrase: str | bytes | None
) -> dict[str, Any]:
    if passphrase is None:
        return {"kind": kind, "version": KEY_FILE_VERSION, "fingerprint": fingerprint, "encrypted": False, **secret}
    salt = os.urandom(SALT_LEN)
    outer: dict[str, Any] = {
        "kind": kind,
        "version": KEY_FILE_VERSION,
        "fingerprint": fingerprint,
        "encrypted": True,
        "kdf": {"name": "scrypt", "salt": _b64(salt), "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P},
        "cipher": "AES-256-GCM",
    }
    key = _scrypt(_passphrase_bytes(passphrase), salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    nonce = os.urandom(NONCE_LEN)
    body = canonical_json(dict(secret), error=KeyFileError, what="private key")
    aad = canonical_json(outer, error=KeyFileError, what="key file header")
    ciphertext = AESGCM(key).encrypt(nonce, body, aad)
    return {**outer, "nonce": _b64(nonce), "ciphertext": _b64(ciphertext)}


@boundary(KeyFileError, KeyFileError)
def save_private_key(
    key: SigningKey | RecipientKey, path: str | os.PathLike[str], *, passphrase: str | bytes | None = None
) -> Path:
    """Write ``key`` to a new file with mode 0600, encrypted under ``passphrase`` when one is given."""
    kind = SIGNING_PRIVATE if isinstance(key, SigningKey) else RECIPIENT_PRIVATE
    document = _private_document(kind, key.fingerprint, key._secret_fields(), passphrase)
    target = Path(path)
    _write_new(target, canonical_json(document, error=KeyFileError, what="key file") + b"\n", 0o600)
    return target


@boundary(KeyFileError, KeyFileError)
def save_public_key(key: SigningPublicKey | RecipientPublicKey, path: str | os.PathLike[str]) -> Path:
    """Write a public key file (mode 0644, never over an existing file)."""
    if isinstance(key, SigningPublicKey):
        document = {
            "kind": SIGNING_PUBLIC,
            "version": KEY_FILE_VERSION,
            "ed25519": _b64(key.ed25519.public_bytes_raw()),
            "ml_dsa_65": _b64(key.ml_dsa.public_bytes_raw()),
            "fingerprint": key.fingerprint,
        }
    else:
        document = {
            "kind": RECIPIENT_PUBLIC,
            "version": KEY_FILE_VERSION,
            "x25519": _b64(key.x25519.public_bytes_raw()),
            "ml_kem_768": _b64(key.ml_kem.public_bytes_raw()),
            "fingerprint": key.fingerprint,
        }
    target = Path(path)
    _write_new(target, canonical_json(document, error=KeyFileError, what="key file") + b"\n", 0o644)
    return target


def _read_document(path: str | os.PathLike[str]) -> dict[str, Any]:
    target = Path(path)
    try:
        fd, info = open_regular_file(target, what="key file", error=KeyFileError)
    except OSError as exc:
        raise KeyFileError(f"cannot open key file {target}: {exc.strerror or exc}") from None
    try:
        if info.st_size > MAX_KEY_FILE:
            raise KeyFileError(f"{target} is too large to be a key file")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(MAX_KEY_FILE + 1)
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {target}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_KEY_FILE:
        raise KeyFileError(f"{target} is too large to be a key file")
    document = load_json(data.strip(), error=KeyFileError, what=f"key file {target}")
    if not isinstance(document, dict):
        raise KeyFileError(f"{target}: a key file holds a JSON object")
    if document.get("version") != KEY_FILE_VERSION:
        raise KeyFileError(f"{target}: unsupported key file version {document.get('version')!r}")
    return document


def _expect_kind(document: Mapping[str, Any], kind: str, path: str | os.PathLike[str]) -> None:
    found = document.get("kind")
    if found != kind:
        raise KeyFileError(f"{path}: expected a {kind}, found {found!r}")


def _check_fingerprint(document: Mapping[str, Any], fingerprint: str, path: str | os.PathLike[str]) -> None:
    if "fingerprint" in document and document["fingerprint"] != fingerprint:
        raise KeyFileError(f"{path}: the recorded fingerprint does not match the key it holds")


@boundary(KeyFileError, KeyFileError)
def is_encrypted(path: str | os.PathLike[str]) -> bool:
    """Whether a private key file is passphrase-protected."""
    return _read_document(path).get("encrypted") is True


def _secret(
    document: Mapping[str, Any], path: str | os.PathLike[str], passphrase: str | bytes | None
) -> dict[str, Any]:
    encrypted = document.get("encrypted")
    if encrypted is False:
        return dict(document)
    if encrypted is not True:
        raise KeyFileError(f"{path}: 'encrypted' must be true or false")
    if passphrase is None:
        raise KeyFileError(f"{path} is passphrase-protected; give its passphrase")
    kdf = document.get("kdf")
    if not isinstance(kdf, dict) or kdf.get("name") != "scrypt" or document.get("cipher") != "AES-256-GCM":
        raise KeyFileError(f"{path}: unsupported key encryption")
    n, r, p = kdf.get("n"), kdf.get("r"), kdf.get("p")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (n, r, p)):
        raise KeyFileError(f"{path}: malformed scrypt parameters")
    assert isinstance(n, int) and isinstance(r, int) and isinstance(p, int)
    if n < 2**14 or n & (n - 1) or not 1 <= r <= 32 or not 1 <= p <= 4 or 128 * n * r > SCRYPT_MAX_MEMORY:
        raise KeyFileError(f"{path}: scrypt parameters out of the accepted range")
    salt_value = kdf.get("salt")
    if not isinstance(salt_value, str) or not 16 <= len(salt_value) <= 88:
        raise KeyFileError(f"{path}: malformed scrypt salt")
    try:
        salt = base64.b64decode(salt_value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeError, ValueError):
        raise KeyFileError(f"{path}: malformed scrypt salt") from None
    nonce = _unb64(document.get("nonce"), NONCE_LEN, f"{path}: nonce")
    ciphertext_value = document.get("ciphertext")
    if not isinstance(ciphertext_value, str) or len(ciphertext_value) > MAX_KEY_FILE:
        raise KeyFileError(f"{path}: malformed ciphertext")
    try:
        ciphertext = base64.b64decode(ciphertext_value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeError, ValueError):
        raise KeyFileError(f"{path}: malformed ciphertext") from None
    outer = {k: document[k] for k in ("kind", "version", "fingerprint", "encrypted", "kdf", "cipher") if k in document}
    aad = canonical_json(outer, error=KeyFileError, what="key file header")
    key = _scrypt(_passphrase_bytes(passphrase), salt, n, r, p)
    try:
        body = AESGCM(key).decrypt(nonce, ciphertext, aad)
    except InvalidTag:
        raise KeyFileError(f"{path}: wrong passphrase, or the key file was altered") from None
    secret = load_json(body, error=KeyFileError, what=f"{path}: private key")
    if not isinstance(secret, dict):
        raise KeyFileError(f"{path}: malformed private key")
    return secret


@boundary(KeyFileError, KeyFileError)
def load_signing_key(path: str | os.PathLike[str], *, passphrase: str | bytes | None = None) -> SigningKey:
    """Read a private signing key file (``NAME.sign.key``)."""
    document = _read_document(path)
    _expect_kind(document, SIGNING_PRIVATE, path)
    secret = _secret(document, path, passphrase)
    ed = _unb64(secret.get("ed25519"), PRIVATE_LENS["ed25519"], f"{path}: ed25519")
    ml = _unb64(secret.get("ml_dsa_65"), PRIVATE_LENS["ml_dsa_65"], f"{path}: ml_dsa_65")
    try:
        key = SigningKey(Ed25519PrivateKey.from_private_bytes(ed), MLDSA65PrivateKey.from_seed_bytes(ml))
    except ValueError as exc:
        raise KeyFileError(f"{path}: invalid private key: {exc}") from None
    _check_fingerprint(document, key.fingerprint, path)
    return key


@boundary(KeyFileError, KeyFileError)
def load_recipient_key(path: str | os.PathLike[str], *, passphrase: str | bytes | None = None) -> RecipientKey:
    """Read a private recipient key file (``NAME.recipient.key``)."""
    document = _read_document(path)
    _expect_kind(document, RECIPIENT_PRIVATE, path)
    secret = _secret(document, path, passphrase)
    x = _unb64(secret.get("x25519"), PRIVATE_LENS["x25519"], f"{path}: x25519")
    ml = _unb64(secret.get("ml_kem_768"), PRIVATE_LENS["ml_kem_768"], f"{path}: ml_kem_768")
    try:
        key = RecipientKey(X25519PrivateKey.from_private_bytes(x), MLKEM768PrivateKey.from_seed_bytes(ml))
    except ValueError as exc:
        raise KeyFileError(f"{path}: invalid private key: {exc}") from None
    _check_fingerprint(document, key.fingerprint, path)
    return key


@boundary(KeyFileError, KeyFileError)
def load_signing_public_key(path: str | os.PathLike[str]) -> SigningPublicKey:
    """Read a public signing key file (``NAME.sign.pub``)."""
    document = _read_document(path)
    _expect_kind(document, SIGNING_PUBLIC, path)
    ed = _unb64(document.get("ed25519"), ED25519_PUBLIC_LEN, f"{path}: ed25519")
    ml = _unb64(document.get("ml_dsa_65"), MLDSA65_PUBLIC_LEN, f"{path}: ml_dsa_65")
    try:
        key = SigningPublicKey.from_raw(ed, ml)
    except ValueError as exc:
        raise KeyFileError(f"{path}: invalid public key: {exc}") from None
    _check_fingerprint(document, key.fingerprint, path)
    return key


@boundary(KeyFileError, KeyFileError)
def load_recipient_public_key(path: str | os.PathLike[str]) -> RecipientPublicKey:
    """Read a public recipient key file (``NAME.recipient.pub``)."""
    document = _read_document(path)
    _expect_kind(document, RECIPIENT_PUBLIC, path)
    x = _unb64(document.get("x25519"), X25519_PUBLIC_LEN, f"{path}: x25519")
    ml = _unb64(document.get("ml_kem_768"), MLKEM768_PUBLIC_LEN, f"{path}: ml_kem_768")
    try:
        key = RecipientPublicKey.from_raw(x, ml)
    except ValueError as exc:
        raise KeyFileError(f"{path}: invalid public key: {exc}") from None
    _check_fingerprint(document, key.fingerprint, path)
    return key


def key_file_paths(directory: str | os.PathLike[str], name: str = "tgsp") -> dict[str, Path]:
    """The four files :func:`keygen` writes for ``name`` in ``directory``."""
    if not _NAME.match(name):
        raise KeyFileError(f"invalid key name {name!r}: use letters, digits, '.', '_' and '-' (at most 64)")
    base = Path(directory)
    return {
        "signing_key": base / f"{name}.sign.key",
        "signing_public_key": base / f"{name}.sign.pub",
        "recipient_key": base / f"{name}.recipient.key",
        "recipient_public_key": base / f"{name}.recipient.pub",
    }


@boundary(KeyFileError, KeyFileError)
def keygen(
    directory: str | os.PathLike[str], name: str = "tgsp", *, passphrase: str | bytes | None = None
) -> dict[str, Path]:
    """Generate a signing pair and a recipient pair and write their four files into ``directory``.

    Nothing is written when any of the four files already exists; private key
    files get mode 0600 and are encrypted under ``passphrase`` when one is given.
    """
    paths = key_file_paths(directory, name)
    for path in paths.values():
        if path.exists() or path.is_symlink():
            raise DestinationExists(f"{path} already exists; refusing to overwrite it")
    if passphrase is not None:
        _passphrase_bytes(passphrase)
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KeyFileError(f"cannot create {directory}: {exc.strerror or exc}") from None
    signing, recipient = SigningKey.generate(), RecipientKey.generate()
    written: list[Path] = []
    try:
        written.append(save_private_key(signing, paths["signing_key"], passphrase=passphrase))
        written.append(save_public_key(signing.public_key(), paths["signing_public_key"]))
        written.append(save_private_key(recipient, paths["recipient_key"], passphrase=passphrase))
        written.append(save_public_key(recipient.public_key(), paths["recipient_public_key"]))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return paths
