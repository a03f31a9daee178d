"""Fixtures for the tensafe-tgsp tests: parties with keys (made once per session) and a packed adapter."""

from __future__ import annotations

from pathlib import Path

import pytest

from tensafe_tgsp import format as fmt
from tests.tgsp.helpers import CERTIFICATE, Party, adapter_files, make_party


@pytest.fixture(scope="session")
def keys_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tgsp-keys")


@pytest.fixture(scope="session")
def producer(keys_dir: Path) -> Party:
    return make_party(keys_dir, "producer")


@pytest.fixture(scope="session")
def customer(keys_dir: Path) -> Party:
    return make_party(keys_dir, "customer")


@pytest.fixture(scope="session")
def stranger(keys_dir: Path) -> Party:
    return make_party(keys_dir, "stranger")


@pytest.fixture(scope="session")
def files() -> dict[str, bytes]:
    return adapter_files()


@pytest.fixture(scope="session")
def package_bytes(
    tmp_path_factory: pytest.TempPathFactory, producer: Party, customer: Party, files: dict[str, bytes]
) -> bytes:
    """A valid three-chunk package from the producer to the customer, as bytes."""
    path = tmp_path_factory.mktemp("tgsp-package") / "adapter.tgsp"
    fmt.pack(
        files,
        path,
        signing_key=producer.signing,
        recipients=[customer.recipient.public_key()],
        base_model="tiny-base",
        lora_config={"rank": 8},
        privacy_certificate=CERTIFICATE,
    )
    return path.read_bytes()


@pytest.fixture
def package(tmp_path: Path, package_bytes: bytes) -> Path:
    """A fresh copy of the valid package, safe to modify."""
    path = tmp_path / "adapter.tgsp"
    path.write_bytes(package_bytes)
    return path
