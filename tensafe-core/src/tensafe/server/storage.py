"""Where artifacts' bytes live: sealed under their tenant's key, in the database or in a directory.

A session state is written into the database, in the transaction that
commits its step and privacy spend: one durable write per step, and no state
file that a crash could leave out of step with its record. Other artifacts
(saved states, packages, datasets, tenant keys) go to the data directory when
the database is this machine's SQLite file, and into the database when it is
a server replicas share, so every replica reaches every artifact.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from sqlalchemy import delete
from sqlalchemy.orm import Session

from tensafe.errors import UsageError
from tensafe.server.crypto import seal, unseal
from tensafe.server.db import ArtifactBlob

#: Artifact kinds always kept in the database, whatever the directory setting.
IN_DATABASE = frozenset({"session"})


class ArtifactStore:
    """Encrypted artifacts: rows of ``artifact_blobs``, or files under ``root/<tenant>/<artifact id>``."""

    def __init__(self, root: Path, *, shared_database: bool = False) -> None:
        self.root = root
        self.shared_database = shared_database
        root.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _path(self, tenant_id: str, artifact_id: str) -> Path:
        return self.root / tenant_id / f"{artifact_id}.bin"

    def in_database(self, kind: str) -> bool:
        return self.shared_database or kind in IN_DATABASE

    def write(self, db: Session, kind: str, tenant_id: str, artifact_id: str, key: bytes, data: bytes) -> str:
        """Encrypt and store ``data`` (a row in ``db``'s transaction, or a durable file); returns its SHA-256."""
        sealed = seal(key, data, f"{tenant_id}/{artifact_id}".encode())
        if self.in_database(kind):
            db.add(ArtifactBlob(id=artifact_id, tenant_id=tenant_id, data=sealed))
        else:
            path = self._path(tenant_id, artifact_id)
            path.parent.mkdir(mode=0o700, exist_ok=True)
            staging = path.with_suffix(".partial")
            with os.fdopen(os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as handle:
                handle.write(sealed)
                handle.flush()
                os.fsync(handle.fileno())
            staging.replace(path)
        return hashlib.sha256(data).hexdigest()

    def read(self, db: Session, tenant_id: str, artifact_id: str, key: bytes) -> bytes:
        blob = db.get(ArtifactBlob, artifact_id)
        if blob is not None and blob.tenant_id == tenant_id:
            sealed = blob.data
        else:
            try:
                sealed = self._path(tenant_id, artifact_id).read_bytes()
            except OSError:
                raise UsageError(f"artifact {artifact_id} is missing from the store") from None
        return unseal(key, sealed, f"{tenant_id}/{artifact_id}".encode())

    def delete(self, db: Session, artifact_id: str) -> None:
        """Remove a database-held artifact inside ``db``'s transaction (files: :meth:`discard_file` after it)."""
        db.execute(delete(ArtifactBlob).where(ArtifactBlob.id == artifact_id))

    def discard_file(self, tenant_id: str, artifact_id: str) -> None:
        self._path(tenant_id, artifact_id).unlink(missing_ok=True)
