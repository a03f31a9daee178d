"""Conformance tests for :class:`tensafe.interfaces.TGSPLoader`."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pytest

from tensafe.errors import TensafeError
from tensafe.interfaces import TGSPLoader
from tensafe.testing.support import fresh_plugin_manager, skip_unless_capable

CERTIFICATE = {"accountant": "rdp", "epsilon": 2.5, "delta": 1e-5, "steps": 100}
FILES = {"adapter_config.json": b'{"r": 4}', "adapter_model.safetensors": bytes(range(256)) * 700}


class TGSPLoaderConformance:
    """Subclass with ``loader_name = "..."`` and :meth:`make_keys` to test a registered TGSP loader."""

    loader_name: ClassVar[str]

    def make_keys(self, directory: Path, name: str) -> dict[str, Path]:
        """Write a key set for ``name``; return paths for ``signing_key``, ``signing_public_key``,
        ``recipient_key`` and ``recipient_public_key``."""
        raise NotImplementedError("subclasses write key files in the loader's own format")

    @pytest.fixture
    def loader(self, request: pytest.FixtureRequest) -> TGSPLoader:
        loader: TGSPLoader = fresh_plugin_manager(autoload=True).registry.tgsp_loader(self.loader_name)
        skip_unless_capable(request, loader)
        return loader

    @pytest.fixture
    def package(self, loader: TGSPLoader, tmp_path: Path) -> tuple[Path, dict[str, Path]]:
        source = tmp_path / "adapter"
        source.mkdir()
        for name, data in FILES.items():
            (source / name).write_bytes(data)
        keys = self.make_keys(tmp_path / "keys", "producer")
        path = tmp_path / "adapter.tgsp"
        loader.pack(
            source,
            path,
            signing_key=keys["signing_key"],
            recipients=[keys["recipient_public_key"]],
            base_model="conformance-base",
            lora_config={"rank": 4},
            privacy_certificate=CERTIFICATE,
        )
        return path, keys

    def test_is_a_tgsp_loader(self, loader: TGSPLoader) -> None:
        assert isinstance(loader, TGSPLoader)

    def test_round_trip(self, loader: TGSPLoader, package: tuple[Path, dict[str, Path]], tmp_path: Path) -> None:
        path, keys = package
        manifest = loader.verify(path, [keys["signing_public_key"]])
        assert manifest == loader.inspect(path)
        loader.load(
            path,
            recipient_key=keys["recipient_key"],
            trusted_signers=[keys["signing_public_key"]],
            destination=tmp_path / "out",
            base_model="conformance-base",
        )
        assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == FILES

    def test_manifest_carries_the_certificate(self, loader: TGSPLoader, package: tuple[Path, dict[str, Path]]) -> None:
        path, keys = package
        text = repr(loader.verify(path, [keys["signing_public_key"]]))
        assert "conformance-base" in text and "2.5" in text

    def test_untrusted_signer_is_refused(
        self, loader: TGSPLoader, package: tuple[Path, dict[str, Path]], tmp_path: Path
    ) -> None:
        path, keys = package
        stranger = self.make_keys(tmp_path / "other", "stranger")
        with pytest.raises(TensafeError):
            loader.verify(path, [stranger["signing_public_key"]])
        with pytest.raises(TensafeError):
            loader.load(
                path,
                recipient_key=keys["recipient_key"],
                trusted_signers=[stranger["signing_public_key"]],
                destination=tmp_path / "out",
                base_model="conformance-base",
            )
        assert not (tmp_path / "out").exists()

    def test_wrong_recipient_cannot_open(
        self, loader: TGSPLoader, package: tuple[Path, dict[str, Path]], tmp_path: Path
    ) -> None:
        path, keys = package
        stranger = self.make_keys(tmp_path / "other", "stranger")
        with pytest.raises(TensafeError):
            loader.load(
                path,
                recipient_key=stranger["recipient_key"],
                trusted_signers=[keys["signing_public_key"]],
                destination=tmp_path / "out",
                base_model="conformance-base",
            )
        assert not (tmp_path / "out").exists()

    def test_a_flipped_byte_is_detected(
        self, loader: TGSPLoader, package: tuple[Path, dict[str, Path]], tmp_path: Path
    ) -> None:
        path, keys = package
        data = bytearray(path.read_bytes())
        for offset in (len(data) // 5, len(data) // 2, len(data) - 3):
            tampered = tmp_path / f"tampered-{offset}.tgsp"
            copy = bytearray(data)
            copy[offset] ^= 0x40
            tampered.write_bytes(bytes(copy))
            with pytest.raises(TensafeError):
                loader.load(
                    tampered,
                    recipient_key=keys["recipient_key"],
                    trusted_signers=[keys["signing_public_key"]],
                    destination=tmp_path / f"out-{offset}",
                    base_model="conformance-base",
                )
            assert not (tmp_path / f"out-{offset}").exists()
