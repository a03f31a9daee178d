"""A TGSP loader test double that reads unsigned JSON manifests; it verifies nothing."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tensafe.interfaces import TGSPLoader


class JSONManifestLoader(TGSPLoader):
    def pack(
        self,
        source: Path,
        output: Path,
        *,
        signing_key: Path,
        recipients: Sequence[Path],
        base_model: str,
        lora_config: Mapping[str, Any] | None = None,
        privacy_certificate: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        manifest = {"base_model": base_model, "files": sorted(p.name for p in Path(source).iterdir())}
        Path(output).write_text(json.dumps(manifest))
        return manifest

    def inspect(self, path: Path) -> dict[str, Any]:
        manifest: dict[str, Any] = json.loads(Path(path).read_text())
        return manifest

    def verify(self, path: Path, trusted_signers: Sequence[Path]) -> dict[str, Any]:
        return self.inspect(path)

    def load(
        self,
        path: Path,
        *,
        recipient_key: Path,
        trusted_signers: Sequence[Path],
        destination: Path,
        allow_untrusted_signer: bool = False,
        base_model: str | None = None,
    ) -> dict[str, Any]:
        return self.inspect(path)
