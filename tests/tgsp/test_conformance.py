"""The tgsp loader passes the core conformance suite."""

from __future__ import annotations

from pathlib import Path

from tensafe.testing import TGSPLoaderConformance
from tensafe_tgsp import keys


class TestTGSPConformance(TGSPLoaderConformance):
    loader_name = "tgsp"

    def make_keys(self, directory: Path, name: str) -> dict[str, Path]:
        return keys.keygen(directory, name)
