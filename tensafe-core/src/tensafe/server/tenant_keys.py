"""The TGSP keys a server holds for each tenant, and the packages tenants upload.

A remote tenant never names a key file: the server signs the packages it
exports for a tenant with that tenant's own signing key, opens packages with
that tenant's own recipient key, and trusts, besides the tenant's own signing
key, only the signers its operator named (``tensafe serve --trusted-signer``).
The key set is made on first use (or by ``tensafe keys create``) through the
TGSP loader's ``keygen`` and kept as an artifact sealed under the tenant key.

Key files exist in the clear only inside a private scratch directory
(``<data>/scratch``, 0700, files 0600) for the one call that needs them, and
what a crash left there is removed when ``tensafe serve`` next starts.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from tensafe.api import ExportedPackage, TenantKeys
from tensafe.capabilities import TGSP_KEYGEN, has
from tensafe.config import TGSPConfig
from tensafe.errors import TensafeError, UsageError
from tensafe.server import audit
from tensafe.server.db import ArtifactRow

if TYPE_CHECKING:
    from tensafe.interfaces import TGSPLoader
    from tensafe.server.service import SessionService

KEYS_KIND = "tgsp-keys"
LOADER = "tgsp"
FILES = ("signing_key", "signing_public_key", "recipient_key", "recipient_public_key")
#: Largest package a tenant may upload.
MAX_PACKAGE_BYTES = 1024**3


@dataclass(frozen=True)
class KeyFiles:
    """A tenant's key set written out for one call."""

    signing_key: Path
    signing_public_key: Path
    recipient_key: Path
    recipient_public_key: Path


def scratch_dir(data_dir: Path) -> Path:
    """The private scratch directory (0700)."""
    scratch = data_dir / "scratch"
    scratch.mkdir(mode=0o700, exist_ok=True)
    return scratch


def clear_scratch(scratch: Path) -> None:
    """Remove what a crashed server left in the scratch directory (at ``tensafe serve`` start only:
    the key and audit commands may run beside a live server that is using it)."""
    for entry in scratch.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


class TenantKeyring:
    """Per-tenant TGSP keys and the operator's trusted signers."""

    def __init__(self, service: SessionService, scratch: Path, trusted_signers: Sequence[Path] = ()) -> None:
        self.service = service
        self.scratch = scratch
        self.trusted_signers = list(trusted_signers)
        self._creating = threading.Lock()

    def loader(self) -> TGSPLoader:
        """The TGSP loader (an error naming what to install when there is none)."""
        return self.service.pm.registry.tgsp_loader(LOADER)

    @contextmanager
    def workspace(self) -> Iterator[Path]:
        """A private directory under the scratch directory, removed afterwards."""
        with tempfile.TemporaryDirectory(dir=self.scratch, prefix="call-") as directory:
            yield Path(directory)

    def _stored(self, db: Session, tenant_id: str) -> ArtifactRow | None:
        return (
            db.execute(
                select(ArtifactRow)
                .where(ArtifactRow.tenant_id == tenant_id, ArtifactRow.kind == KEYS_KIND)
                .order_by(ArtifactRow.created, ArtifactRow.id)
                .limit(1)
            )
            .scalars()
            .first()
        )

    def _texts(self, tenant_id: str) -> dict[str, str]:
        """The tenant's key files' contents, made on first use."""
        with self.service.db() as db:
            row = self._stored(db, tenant_id)
            if row is not None:
                return dict(
                    json.loads(self.service.store.read(db, tenant_id, row.id, self.service.tenant_key(db, tenant_id)))
                )
        with self._creating, self.service.db() as db:
            row = self._stored(db, tenant_id)
            if row is not None:
                key = self.service.tenant_key(db, tenant_id)
                return dict(json.loads(self.service.store.read(db, tenant_id, row.id, key)))
            loader = self.loader()
            if not has(loader, TGSP_KEYGEN):
                raise UsageError(f"the TGSP loader {LOADER!r} cannot create keys (no {TGSP_KEYGEN!r} capability)")
            with self.workspace() as directory:
                paths = loader.keygen(directory / "keys", "tenant")
                texts = {name: paths[name].read_text(encoding="utf-8") for name in FILES}
            self.service.store_artifact(db, tenant_id, KEYS_KIND, json.dumps(texts).encode(), "tgsp keys")
            return texts

    def ensure(self, tenant_id: str) -> None:
        """Make the tenant's key set now if it has none (``tensafe keys create``)."""
        self._texts(tenant_id)

    def public(self, tenant_id: str) -> TenantKeys:
        texts = self._texts(tenant_id)
        return TenantKeys(
            signing_public_key=texts["signing_public_key"], recipient_public_key=texts["recipient_public_key"]
        )

    @contextmanager
    def files(self, tenant_id: str, directory: Path) -> Iterator[KeyFiles]:
        """The tenant's key set as files in ``directory`` (a :meth:`workspace`), for one call."""
        texts = self._texts(tenant_id)
        keys = directory / "keys"
        keys.mkdir(mode=0o700)
        for name, text in texts.items():
            path = keys / name
            path.touch(mode=0o600)
            path.write_text(text, encoding="utf-8")
        yield KeyFiles(*(keys / name for name in FILES))

    def export_settings(self, keys: KeyFiles, directory: Path, recipients: Sequence[str]) -> TGSPConfig:
        """Sign with the tenant's key; encrypt to its recipient key and the public keys the request names."""
        extra = []
        for index, text in enumerate(recipients):
            path = directory / f"recipient-{index}.pub"
            path.write_text(text, encoding="utf-8")
            extra.append(path)
        return TGSPConfig(loader=LOADER, signing_key=keys.signing_key, recipients=[keys.recipient_public_key, *extra])

    def open_settings(self, keys: KeyFiles) -> TGSPConfig:
        """Open with the tenant's recipient key; trust the tenant's own signing key and the operator's signers."""
        return TGSPConfig(
            loader=LOADER,
            recipient_key=keys.recipient_key,
            trusted_signers=[keys.signing_public_key, *self.trusted_signers],
        )

    def check_package(self, tenant_id: str, package: Path, base_model: str) -> dict[str, object]:
        """Verify an uploaded package as the server would open it: signed by a trusted signer, within its
        policy for ``base_model``, and decryptable with the tenant's recipient key. Returns the manifest."""
        loader = self.loader()
        with self.workspace() as directory, self.files(tenant_id, directory) as keys:
            settings = self.open_settings(keys)
            try:
                manifest = loader.load(
                    package,
                    recipient_key=keys.recipient_key,
                    trusted_signers=settings.trusted_signers,
                    destination=directory / "opened",
                    base_model=base_model,
                )
            except TensafeError as exc:
                raise UsageError(f"package refused: {exc}") from None
        return manifest

    def package_bytes(self, tenant_id: str, artifact_id: str) -> bytes:
        """A TGSP package the tenant exported (itself signed and encrypted to its recipients)."""
        with self.service.db() as db:
            return self.service._artifact(db, tenant_id, artifact_id, "tgsp")[1]

    def upload(self, tenant_id: str, package: Path, name: str = "") -> ExportedPackage:
        """Store an uploaded TGSP package once it verifies as the server would open it (see :meth:`check_package`)."""
        manifest = self.check_package(tenant_id, package, self._base_model_id(None))
        data = package.read_bytes()
        with self.service.db() as db:
            package_id = manifest.get("package_id")
            meta = {"package_id": package_id, "uploaded": True}
            artifact_id = self.service.store_artifact(db, tenant_id, "tgsp", data, name, meta)
            uploaded = ExportedPackage(artifact_id=artifact_id, package_id=str(package_id), step=0)
            audit.append(
                db,
                self.service.keyring.audit_key,
                tenant_id,
                "package.upload",
                artifact_id,
                {"name": name, "sha256": hashlib.sha256(data).hexdigest()},
                uploaded.model_dump(),
            )
        return uploaded

    def _base_model_id(self, name: str | None) -> str:
        from tensafe.engine.packaging import EMBEDDED_MODEL_ID

        path = self.service.models.resolve(name)
        return EMBEDDED_MODEL_ID if path is None else str(path)
