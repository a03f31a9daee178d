"""A TGSP loader test double that reads unsigned JSON manifests; it verifies nothing."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tensafe.interfaces import TGSPLoader


class JSONManifestLoader(TGSPLoader):
    def inspect(self, path: Path) -> dict[str, Any]:
        manifest: dict[str, Any] = json.loads(Path(path).read_text())
        return manifest

    def verify(self, path: Path, trusted_signers: Sequence[Path]) -> dict[str, Any]:
        return self.inspect(path)

    def load(
        self, path: Path, *, recipient_key: Path, trusted_signers: Sequence[Path], destination: Path
    ) -> dict[str, Any]:
        return self.inspect(path)
