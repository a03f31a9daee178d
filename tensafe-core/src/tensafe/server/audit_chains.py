"""Each tenant's audit chain as the API and ``tensafe audit verify`` see it: records, verification, receipts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from sqlalchemy import select

from tensafe.api import AuditReceipt, AuditRecordInfo, AuditVerification
from tensafe.errors import NotFound
from tensafe.server import audit
from tensafe.server.db import AuditRow, Tenant
from tensafe.server.queued import AUDIT_SEQ_MAX

if TYPE_CHECKING:
    from tensafe.server.service import SessionService


class AuditChains:
    """Reads, verifies and signs receipts for the per-tenant chains :mod:`tensafe.server.audit` keeps."""

    def __init__(self, service: SessionService) -> None:
        self.service = service

    def records(self, tenant_id: str, limit: int = 1000, after: int = 0) -> list[AuditRecordInfo]:
        if after >= AUDIT_SEQ_MAX:
            return []  # no record lies past the sequence column's range (PostgreSQL would refuse the query)
        with self.service.db() as db:
            rows = db.execute(
                select(AuditRow)
                .where(AuditRow.tenant_id == tenant_id, AuditRow.seq > after)
                .order_by(AuditRow.seq)
                .limit(limit)
            ).scalars()
            return [AuditRecordInfo.model_validate(row, from_attributes=True) for row in rows]

    def verify(self, tenant_id: str) -> AuditVerification:
        with self.service.db() as db:
            return audit.verify(db, self.service.keyring.audit_key, tenant_id, self.service.heads)

    def receipt(self, tenant_id: str) -> AuditReceipt:
        """A signed receipt for the tenant's chain as it stands (its last record's number and hash)."""
        with self.service.db() as db:
            tenant = db.get(Tenant, tenant_id)
            if tenant is None:
                raise NotFound("no such tenant")
            return self.service.receipts.issue(tenant_id, tenant.audit_seq, tenant.audit_head)

    def verify_all(self, receipts: Sequence[AuditReceipt] = ()) -> dict[str, AuditVerification]:
        """Every tenant's chain, by tenant name (for ``tensafe audit verify``), checked against ``receipts``.

        A tenant the head file or a receipt knows but the database does not
        was deleted from it, records and all: it is reported under its id.
        """
        by_tenant: dict[str, list[AuditReceipt]] = {}
        for receipt in receipts:
            by_tenant.setdefault(receipt.tenant_id, []).append(receipt)
        key = self.service.keyring.audit_key
        with self.service.db() as db:
            tenants = db.execute(select(Tenant.id, Tenant.name).order_by(Tenant.name)).all()
            results = {
                name: audit.verify(db, key, tid, self.service.heads, by_tenant.get(tid, ()), self.service.receipts)
                for tid, name in tenants
            }
        gone = "this tenant's chain is recorded outside the database but the database no longer has the tenant"
        known = {tid for tid, _ in tenants}
        for tenant_id in sorted((set(self.service.heads.read()) | set(by_tenant)) - known - {""}):
            problems = [gone]
            for receipt in by_tenant.get(tenant_id, ()):
                problems.append(
                    self.service.receipts.problem(receipt) or f"a signed receipt shows record {receipt.seq}"
                )
            results[f"tenant {tenant_id}"] = AuditVerification(ok=False, records=0, problems=problems)
        return results
