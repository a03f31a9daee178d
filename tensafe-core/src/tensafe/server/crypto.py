"""Keys and encryption at rest: a master key wraps one data key per tenant; artifacts use AES-256-GCM.

The master key comes from ``TENSAFE_MASTER_KEY`` (64 hex digits) or from a
file: ``--master-key-file`` / ``TENSAFE_MASTER_KEY_FILE``, else ``master.key``
in the data directory, created (mode 0600) on first start. It also keys the
audit chain's HMACs and the metadata MACs, so rows cannot be re-hashed without it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tensafe.errors import ConfigError, UsageError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MASTER_KEY_ENV = "TENSAFE_MASTER_KEY"
MASTER_KEY_FILE_ENV = "TENSAFE_MASTER_KEY_FILE"
MASTER_KEY_FILE = "master.key"
ARTIFACT_MAGIC = b"TSA1"
NONCE_BYTES = 12


def load_master_key(data_dir: Path, key_file: Path | None = None) -> bytes:
    """The master key from the environment or its file (created on first use): ``key_file``, else in ``data_dir``."""
    raw = os.environ.get(MASTER_KEY_ENV)
    if raw:
        try:
            key = bytes.fromhex(raw.strip())
        except ValueError:
            raise ConfigError(f"{MASTER_KEY_ENV} must be 64 hex digits") from None
        if len(key) != 32:
            raise ConfigError(f"{MASTER_KEY_ENV} must be 64 hex digits (32 bytes)")
        return key
    from_env = os.environ.get(MASTER_KEY_FILE_ENV)
    path = key_file or (Path(from_env) if from_env else data_dir / MASTER_KEY_FILE)
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
    key = bytes.fromhex(path.read_text().strip())
    if len(key) != 32:
        raise ConfigError(f"{path} does not hold a 32-byte hex key")
    return key


def _aesgcm(key: bytes) -> AESGCM:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key)


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    nonce = secrets.token_bytes(NONCE_BYTES)
    return ARTIFACT_MAGIC + nonce + _aesgcm(key).encrypt(nonce, plaintext, aad)


def unseal(key: bytes, blob: bytes, aad: bytes) -> bytes:
    from cryptography.exceptions import InvalidTag

    if not blob.startswith(ARTIFACT_MAGIC):
        raise UsageError("not a TenSafe encrypted artifact")
    nonce = blob[len(ARTIFACT_MAGIC) : len(ARTIFACT_MAGIC) + NONCE_BYTES]
    try:
        result: bytes = _aesgcm(key).decrypt(nonce, blob[len(ARTIFACT_MAGIC) + NONCE_BYTES :], aad)
    except InvalidTag:
        raise UsageError("artifact failed authentication: wrong key, or the file was altered") from None
    return result


class KeyRing:
    """Wraps and unwraps tenant data keys with the master key; derives the audit key."""

    def __init__(self, master_key: bytes) -> None:
        self._master = master_key
        self.audit_key = hmac.new(master_key, b"tensafe-audit-chain-v1", hashlib.sha256).digest()
        #: Authenticates the session metadata (step, privacy spend) the database keeps beside each state.
        self.meta_key = hmac.new(master_key, b"tensafe-session-meta-v1", hashlib.sha256).digest()
        #: Authenticates the audit head kept outside the database.
        self.head_key = hmac.new(master_key, b"tensafe-audit-head-v1", hashlib.sha256).digest()
        #: Seeds the Ed25519 key that signs audit receipts.
        self.receipt_seed = hmac.new(master_key, b"tensafe-audit-receipt-v1", hashlib.sha256).digest()

    def new_tenant_key(self, tenant_id: str) -> bytes:
        """A fresh data key, wrapped for storage."""
        return seal(self._master, secrets.token_bytes(32), b"tenant-key:" + tenant_id.encode())

    def tenant_key(self, tenant_id: str, wrapped: bytes) -> bytes:
        return unseal(self._master, wrapped, b"tenant-key:" + tenant_id.encode())


def seal_text(key: bytes, text: str, aad: str) -> str:
    """``text`` encrypted and authenticated for a database column (base64)."""
    return base64.b64encode(seal(key, text.encode(), aad.encode())).decode()


def open_text(key: bytes, stored: str, aad: str) -> str:
    try:
        blob = base64.b64decode(stored, validate=True)
    except ValueError:
        blob = b""
    return unseal(key, blob, aad.encode()).decode()


def _meta_mac(key: bytes, binding: str, canonical: str) -> str:
    return hmac.new(key, json.dumps([binding, canonical]).encode(), hashlib.sha256).hexdigest()


def sign_meta(key: bytes, binding: str, meta: dict[str, Any]) -> str:
    """``meta`` as stored: canonical JSON and its HMAC, bound to what it describes (``binding``).

    The binding names the state artifact the metadata belongs to, so metadata
    copied from another row does not verify either.
    """
    canonical = json.dumps(meta, sort_keys=True, separators=(",", ":"))
    return json.dumps({"meta": meta, "mac": _meta_mac(key, binding, canonical)}, sort_keys=True)


def open_meta(key: bytes, binding: str, stored: str) -> dict[str, Any]:
    """The metadata ``sign_meta`` stored, once its HMAC checks; an edited or unsigned value is refused."""
    from tensafe.errors import OperationFailed

    try:
        sealed = json.loads(stored)
        meta, mac = sealed["meta"], sealed["mac"]
    except (ValueError, TypeError, KeyError):
        meta, mac = None, ""
    if not isinstance(meta, dict) or not isinstance(mac, str):
        meta, mac = {}, ""
    canonical = json.dumps(meta, sort_keys=True, separators=(",", ":"))
    if not hmac.compare_digest(_meta_mac(key, binding, canonical), mac):
        raise OperationFailed(
            f"the stored metadata of {binding} failed authentication: the database was edited "
            "(or the record predates signed metadata); refusing to load a step count or privacy spend from it",
            code="record_tampered",
        )
    result: dict[str, Any] = meta
    return result
