"""Tenants and their API keys. Keys are shown once and stored only as SHA-256 hashes.

A key reads ``tsk_<key id>_<secret>``: the id finds the row, the secret (32
random bytes) is compared by hash in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from tensafe.errors import NotFound, Unauthorized, UsageError
from tensafe.server.crypto import KeyRing
from tensafe.server.db import ApiKey, Tenant

KEY_PREFIX = "tsk"


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def ensure_tenant(db: Session, keyring: KeyRing, name: str) -> Tenant:
    """The tenant called ``name``, created (with a fresh wrapped data key) if absent."""
    if not name or len(name) > 200:
        raise UsageError("a tenant name is 1 to 200 characters")
    tenant = db.execute(select(Tenant).where(Tenant.name == name)).scalar_one_or_none()
    if tenant is None:
        tenant_id = uuid.uuid4().hex
        tenant = Tenant(id=tenant_id, name=name, wrapped_key=keyring.new_tenant_key(tenant_id), created=time.time())
        db.add(tenant)
        db.flush()
    return tenant


def create_key(db: Session, keyring: KeyRing, tenant_name: str, label: str = "") -> tuple[str, str]:
    """A new API key for the tenant (created if needed); returns ``(key id, full key)``."""
    tenant = ensure_tenant(db, keyring, tenant_name)
    key_id, secret = uuid.uuid4().hex[:16], secrets.token_urlsafe(32)
    db.add(ApiKey(id=key_id, tenant_id=tenant.id, key_hash=_hash(secret), label=label, created=time.time()))
    return key_id, f"{KEY_PREFIX}_{key_id}_{secret}"


def list_keys(db: Session) -> list[dict[str, Any]]:
    rows = db.execute(select(ApiKey, Tenant.name).join(Tenant).order_by(ApiKey.created)).all()
    return [
        {"key_id": k.id, "tenant": name, "label": k.label, "created": k.created, "revoked": k.revoked}
        for k, name in rows
    ]


def revoke_key(db: Session, key_id: str) -> None:
    key = db.get(ApiKey, key_id)
    if key is None:
        raise NotFound(f"no API key {key_id}")
    key.revoked = True


def authenticate(db: Session, token: str | None) -> str:
    """The tenant id an API key belongs to; :class:`Unauthorized` for a missing, unknown or revoked key."""
    if not token:
        raise Unauthorized("this endpoint needs an API key: send 'Authorization: Bearer <key>'")
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX:
        raise Unauthorized("malformed API key")
    key = db.get(ApiKey, parts[1])
    if key is None or key.revoked or not hmac.compare_digest(key.key_hash, _hash(parts[2])):
        raise Unauthorized("unknown or revoked API key")
    return key.tenant_id
