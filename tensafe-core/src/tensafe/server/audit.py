"""The per-tenant audit chain: each record's HMAC covers its fields and the previous record's.

Editing a row changes its hash; deleting or reordering rows breaks the links
or the sequence; deleting the newest rows disagrees with the head kept on the
tenant row. The HMAC key derives from the master key, so a database writer
without it cannot re-hash a forged chain.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from tensafe.api import AuditVerification
from tensafe.server.db import AuditRow, Tenant


def digest(data: Any) -> str:
    """SHA-256 of a JSON-ready value in canonical form."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


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
    tenant = db.execute(select(Tenant).where(Tenant.id == tenant_id).with_for_update()).scalar_one()
    row = AuditRow(
        tenant_id=tenant_id,
        seq=tenant.audit_seq + 1,
        time=time.time(),
        operation=operation,
        subject=subject,
        request_hash=digest(request),
        result_hash=digest(result),
        epsilon=epsilon,
        prev_hash=tenant.audit_head,
    )
    row.hash = _record_hash(key, row)
    tenant.audit_seq, tenant.audit_head = row.seq, row.hash
    db.add(row)
    return row


def verify(db: Session, key: bytes, tenant_id: str) -> AuditVerification:
    """Check one tenant's chain from its first record to the head on the tenant row."""
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
    return AuditVerification(ok=not problems, records=len(rows), problems=problems)
