"""The per-tenant audit chain: each record's HMAC covers its fields and the previous record's.

Editing a row changes its hash; deleting or reordering rows breaks the links
or the sequence. Cutting the newest rows (and moving the head on the tenant
row to match) disagrees with the head kept outside the database: the file
``audit-head.json`` in the data directory holds each tenant's last sequence
number and record hash under an HMAC keyed from the master key. The HMAC keys
derive from the master key, so a database writer without it can neither
re-hash a forged chain nor move the outside head.

The head file is written after the database commits (never before: a rolled
back record must not be expected), atomically, and only forward. A crash
between the two leaves the file one transaction behind, which verification
accepts: the chain must contain the record the file names, and may go on.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from tensafe.api import AuditReceipt, AuditVerification
from tensafe.server.db import AuditRow, Tenant
from tensafe.server.receipts import ReceiptSigner, chain_problems


def digest(key: bytes, data: Any) -> str:
    """HMAC-SHA-256 of a JSON-ready value in canonical form, keyed so a guessed value cannot be checked without it."""
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hmac.new(key, b"tensafe audit: value\x00" + canonical, hashlib.sha256).hexdigest()


def _record_hash(key: bytes, row: AuditRow) -> str:
    fields = [
        row.tenant_id,
        row.seq,
        repr(row.time),
        row.operation,
        row.subject,
        row.request_hash,
        row.result_hash,
        None if row.epsilon is None else repr(row.epsilon),
        row.prev_hash,
    ]
    return hmac.new(key, json.dumps(fields).encode(), hashlib.sha256).hexdigest()


def append(
    db: Session,
    key: bytes,
    tenant_id: str,
    operation: str,
    subject: str,
    request: Any,
    result: Any,
    epsilon: float | None = None,
) -> AuditRow:
    """Add a record to the tenant's chain inside the caller's transaction (the tenant row is locked)."""
    # FOR NO KEY UPDATE: appends to one chain queue behind each other, but not behind the key-share
    # locks that rows referencing the tenant take (another session's state or future inserted in the
    # same kind of transaction), which FOR UPDATE would turn into deadlocks on PostgreSQL.
    query = select(Tenant).where(Tenant.id == tenant_id).with_for_update(key_share=True)
    tenant = db.execute(query).scalar_one()
    row = AuditRow(
        tenant_id=tenant_id,
        seq=tenant.audit_seq + 1,
        time=time.time(),
        operation=operation,
        subject=subject,
        request_hash=digest(key, request),
        result_hash=digest(key, result),
        epsilon=epsilon,
        prev_hash=tenant.audit_head,
    )
    row.hash = _record_hash(key, row)
    tenant.audit_seq, tenant.audit_head = row.seq, row.hash
    db.add(row)
    db.info.setdefault(PENDING_HEADS, {})[tenant_id] = (row.seq, row.hash)
    return row


#: Where ``append`` leaves the heads of a transaction, for :meth:`HeadFile.advance` once it commits.
PENDING_HEADS = "tensafe_audit_heads"
HEAD_FILE = "audit-head.json"


class HeadFile:
    """Each tenant's chain head, kept outside the database under an HMAC so a cut chain shows."""

    def __init__(self, data_dir: Path, key: bytes) -> None:
        self.path = data_dir / HEAD_FILE
        self._lock_path = data_dir / "audit-head.lock"
        self._key = key
        self._thread_lock = threading.Lock()

    def _mac(self, tenant_id: str, seq: int, head: str) -> str:
        return hmac.new(self._key, json.dumps([tenant_id, seq, head]).encode(), hashlib.sha256).hexdigest()

    def exists(self) -> bool:
        return self.path.exists()

    def read(self) -> dict[str, Any]:
        """The stored entries by tenant id (unchecked); empty if there is no file."""
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError:
            return {"": None}  # unreadable: every tenant's entry fails its check
        tenants = data.get("tenants") if isinstance(data, dict) else None
        return tenants if isinstance(tenants, dict) else {"": None}

    def head(self, tenant_id: str) -> tuple[int, str] | str:
        """The tenant's (sequence number, record hash), or why there is none to trust."""
        entry = self.read().get(tenant_id)
        if entry is None:
            return "no head for this tenant outside the database (head file missing or entry removed)"
        try:
            seq, head, mac = int(entry["seq"]), str(entry["head"]), str(entry["mac"])
        except (KeyError, TypeError, ValueError):
            return "the head kept outside the database is unreadable"
        if not hmac.compare_digest(self._mac(tenant_id, seq, head), mac):
            return "the head kept outside the database was altered"
        return seq, head

    def advance(self, heads: dict[str, tuple[int, str]]) -> None:
        """Record committed heads; an entry only moves forward (concurrent writers commit out of order)."""
        with self._thread_lock, os.fdopen(os.open(self._lock_path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            tenants = {k: v for k, v in self.read().items() if k and isinstance(v, dict)}
            for tenant_id, (seq, head) in heads.items():
                current = tenants.get(tenant_id)
                if current is not None and int(current.get("seq", 0)) >= seq:
                    continue
                tenants[tenant_id] = {"seq": seq, "head": head, "mac": self._mac(tenant_id, seq, head)}
            staging = self.path.with_suffix(".partial")
            fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                json.dump({"tenants": tenants}, handle, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            # No directory fsync: a rename lost to a crash leaves the file behind, which verifies.
            staging.replace(self.path)


def verify(
    db: Session,
    key: bytes,
    tenant_id: str,
    outside: HeadFile,
    receipts: Sequence[AuditReceipt] = (),
    signer: ReceiptSigner | None = None,
) -> AuditVerification:
    """Check one tenant's chain from its first record to the head on the tenant row and the one outside,
    and against the signed receipts its client kept (each must be ``signer``'s and name a record the chain holds).
    """
    tenant = db.get(Tenant, tenant_id)
    if tenant is None:
        return AuditVerification(ok=False, records=0, problems=[f"no tenant {tenant_id}"])
    rows = db.execute(select(AuditRow).where(AuditRow.tenant_id == tenant_id).order_by(AuditRow.id)).scalars().all()
    problems: list[str] = []
    prev = ""
    for position, row in enumerate(rows, start=1):
        if row.seq != position:
            problems.append(f"record at position {position} has sequence number {row.seq}: rows deleted or reordered")
        if row.prev_hash != prev:
            problems.append(f"record {row.seq} does not link to the record before it")
        if not hmac.compare_digest(_record_hash(key, row), row.hash):
            problems.append(f"record {row.seq} ({row.operation}) was altered")
        prev = row.hash
    if tenant.audit_seq != len(rows) or tenant.audit_head != prev:
        problems.append(f"chain ends at record {len(rows)} but the head says {tenant.audit_seq}: records removed")
    kept = outside.head(tenant_id)
    if isinstance(kept, str):
        if rows:
            problems.append(kept)
    elif {row.seq: row.hash for row in rows}.get(kept[0]) != kept[1]:
        problems.append(
            f"chain ends at record {len(rows)} but the head kept outside the database says {kept[0]}: records removed"
        )
    hashes = {row.seq: row.hash for row in rows}
    for receipt in receipts:
        forged = signer.problem(receipt) if signer is not None else None
        problems.extend([forged] if forged else chain_problems(receipt, hashes))
    return AuditVerification(ok=not problems, records=len(rows), problems=problems)
