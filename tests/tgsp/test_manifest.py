"""The manifest validators: one per field, every field covered, checked in the order the fields depend on."""

from __future__ import annotations

from pathlib import Path

import pytest

from tensafe_tgsp import format as fmt
from tensafe_tgsp.errors import MalformedPackage, PackError
from tensafe_tgsp.format.manifest import MANIFEST_FIELDS


def test_every_manifest_field_has_exactly_one_validator() -> None:
    assert set(MANIFEST_FIELDS) == fmt.MANIFEST_KEYS
    order = list(MANIFEST_FIELDS)
    assert order.index("files") < order.index("payload")  # payload.size is checked against the files


def test_the_format_package_exports_every_public_name() -> None:
    assert all(hasattr(fmt, name) for name in fmt.__all__)
    assert {"pack", "inspect", "verify", "unpack", "validate_manifest", "HEADER", "MAGIC"} <= set(fmt.__all__)


def test_the_first_field_at_fault_is_named_with_the_callers_error(package: Path) -> None:
    manifest = fmt.inspect(package)
    assert fmt.validate_manifest(manifest) is manifest
    broken = {**manifest, "created": "yesterday", "recipients": []}
    with pytest.raises(MalformedPackage, match="created must be a UTC time"):
        fmt.validate_manifest(broken)
    with pytest.raises(PackError, match="recipients must be 1 to 1024"):
        fmt.validate_manifest({**manifest, "recipients": []}, error=PackError)
    payload = {**manifest["payload"], "size": manifest["payload"]["size"] + 1}
    with pytest.raises(MalformedPackage, match="payload.size does not match the files"):
        fmt.validate_manifest({**manifest, "payload": payload})
