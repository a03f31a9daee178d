"""The manifest (SPEC.md, "Manifest"): one validator per field, and its canonical encoding."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from tensafe_tgsp._canonical import canonical_json, load_json
from tensafe_tgsp.errors import MalformedPackage, PackError, TGSPError
from tensafe_tgsp.format.certificate import validate_certificate
from tensafe_tgsp.format.paths import PathSet, check_path
from tensafe_tgsp.format.policy import parse_not_after
from tensafe_tgsp.format.spec import (
    AEAD_NAME,
    CHUNK_SIZE,
    FORMAT_VERSION,
    HEX64,
    HEX_PREFIX,
    MANIFEST_KEYS,
    MAX_FILES,
    MAX_PAYLOAD_SIZE,
    MAX_RECIPIENTS,
    TIMESTAMP,
    archive_size,
    chunk_count,
)

#: Checks one manifest field: (its value, the whole manifest, the error type to raise).
FieldValidator = Callable[[Any, Mapping[str, Any], type[TGSPError]], None]

MAX_ALLOWED_BASE_MODELS = 1024


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_hex64(value: Any) -> bool:
    return isinstance(value, str) and HEX64.fullmatch(value) is not None


def _keys(value: Any, expected: frozenset[str] | set[str], where: str, error: type[TGSPError]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise error(f"manifest: {where} must be an object")
    missing, unknown = sorted(expected - set(value)), sorted(set(value) - expected)
    if missing or unknown:
        raise error(f"manifest: {where} lacks {missing} / has unknown fields {unknown}")
    return value


def _text(value: Any, where: str, error: type[TGSPError], *, optional: bool = False, limit: int = 1024) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not value or len(value) > limit:
        raise error(f"manifest: {where} must be a non-empty string of at most {limit} characters")


# -- one validator per field, in the order they are checked ----------------------


def _format(value: Any, _: Mapping[str, Any], error: type[TGSPError]) -> None:
    if value != "TGSP":
        raise error(f"manifest: not a TGSP version {FORMAT_VERSION} manifest")


def _format_version(value: Any, _: Mapping[str, Any], error: type[TGSPError]) -> None:
    if value != FORMAT_VERSION or not _is_int(value):
        raise error(f"manifest: not a TGSP version {FORMAT_VERSION} manifest")


def _package_id(value: Any, _: Mapping[str, Any], error: type[TGSPError]) -> None:
    try:
        if not isinstance(value, str) or str(uuid.UUID(value)) != value:
            raise ValueError(value)
    except ValueError:
        raise error("manifest: package_id must be a lower-case UUID") from None


def _created(value: Any, _: Mapping[str, Any], error: type[TGSPError]) -> None:
    try:
        if not isinstance(value, str) or not TIMESTAMP.fullmatch(value):
            raise ValueError(value)
        dt.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        raise error("manifest: created must be a UTC time YYYY-MM-DDTHH:MM:SSZ") from None


def _producer(value: Any, _: Mapping[str, Any], error: type[TGSPError]) -> None:
    producer = _keys(value, {"fingerprint"}, "producer", error)
    if not _is_hex64(producer["fingerprint"]):
        raise error("manifest: producer.fingerprint must be 64 lower-case hex digits")


def _base_model(value: Any, _: Mapping[str, Any], error: type[TGSPError]) -> None:
    base = _keys(value, {"id", "sha256", "revision"}, "base_model", error)
    _text(base["id"], "base_model.id", error)
    if base["sha256"] is not None and not _is_hex64(base["sha256"]):
        raise error("manifest: base_model.sha256 must be null or 64 lower-case hex digits")
    _text(base["revision"], "base_model.revision", error, optional=True)


def _lora(value: Any, _: Mapping[str, Any], error: type[TGSPError]) -> None:
    if not isinstance(value, dict):
        raise error("manifest: lora must be an object")


def _file_path(i: int, entry: Any, error: type[TGSPError]) -> str:
    """The (safe) path of content-index entry ``i``."""
    _keys(entry, {"path", "size", "sha256"}, f"files[{i}]", error)
    return check_path(entry["path"])


def _file_size_and_hash(i: int, entry: Mapping[str, Any], error: type[TGSPError]) -> None:
    if not _is_int(entry["size"]) or not 0 <= entry["size"] <= MAX_PAYLOAD_SIZE:
        raise error(f"manifest: files[{i}].size must be an integer in [0, 2**40]")
    if not _is_hex64(entry["sha256"]):
        raise error(f"manifest: files[{i}].sha256 must be 64 lower-case hex digits")


def _files(value: Any, _: Mapping[str, Any], error: type[TGSPError]) -> None:
    if not isinstance(value, list) or len(value) > MAX_FILES:
        raise error(f"manifest: files must be a list of at most {MAX_FILES} entries")
    seen = PathSet()
    previous: str | None = None
    for i, entry in enumerate(value):
        path = _file_path(i, entry, error)
        seen.add(path)
        if previous is not None and path <= previous:
            raise error("manifest: files must be sorted by path")
        previous = path
        _file_size_and_hash(i, entry, error)


def _payload(value: Any, manifest: Mapping[str, Any], error: type[TGSPError]) -> None:
    payload = _keys(value, {"aead", "chunk_size", "size", "chunks", "nonce_prefix"}, "payload", error)
    if payload["aead"] != AEAD_NAME or payload["chunk_size"] != CHUNK_SIZE or not _is_int(payload["chunk_size"]):
        raise error(f"manifest: the payload must be {AEAD_NAME} in chunks of {CHUNK_SIZE} bytes")
    size, chunks = payload["size"], payload["chunks"]
    if not _is_int(size) or not 1 <= size <= MAX_PAYLOAD_SIZE or size != archive_size(manifest["files"]):
        raise error("manifest: payload.size does not match the files")
    if not _is_int(chunks) or chunks != chunk_count(size):
        raise error("manifest: payload.chunks does not match payload.size")
    if not isinstance(payload["nonce_prefix"], str) or not HEX_PREFIX.fullmatch(payload["nonce_prefix"]):
        raise error("manifest: payload.nonce_prefix must be 16 lower-case hex digits")


def _recipients(value: Any, _: Mapping[str, Any], error: type[TGSPError]) -> None:
    if (
        not isinstance(value, list)
        or not 1 <= len(value) <= MAX_RECIPIENTS
        or not all(_is_hex64(r) for r in value)
        or len(set(value)) != len(value)
    ):
        raise error(f"manifest: recipients must be 1 to {MAX_RECIPIENTS} distinct key fingerprints")


def _privacy_certificate(value: Any, _: Mapping[str, Any], error: type[TGSPError]) -> None:
    if value is not None:
        validate_certificate(value, error=error)


def _allowed_base_models(allowed: Any, error: type[TGSPError]) -> None:
    if allowed is None:
        return
    if (
        not isinstance(allowed, list)
        or not 1 <= len(allowed) <= MAX_ALLOWED_BASE_MODELS
        or len(set(map(str, allowed))) != len(allowed)
    ):
        raise error(
            f"manifest: policy.allowed_base_models must be null or 1 to {MAX_ALLOWED_BASE_MODELS} distinct names"
        )
    for name in allowed:
        _text(name, "policy.allowed_base_models[]", error)


def _not_after(not_after: Any, error: type[TGSPError]) -> None:
    if not_after is None:
        return
    try:
        if not isinstance(not_after, str):
            raise ValueError(not_after)
        parse_not_after(not_after)
    except (ValueError, OverflowError):
        raise error("manifest: policy.not_after must be YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ") from None


def _policy(value: Any, _: Mapping[str, Any], error: type[TGSPError]) -> None:
    if value is None:
        return
    policy = _keys(value, {"allowed_base_models", "not_after"}, "policy", error)
    _allowed_base_models(policy["allowed_base_models"], error)
    _not_after(policy["not_after"], error)


def _encrypted_adapter(value: Any, _: Mapping[str, Any], error: type[TGSPError]) -> None:
    if value is not None and not isinstance(value, dict):
        raise error("manifest: encrypted_adapter must be null or an object")


#: Every manifest field (exactly :data:`MANIFEST_KEYS`) and its validator, in checking order:
#: ``payload`` comes after ``files``, whose archive size it must equal.
MANIFEST_FIELDS: dict[str, FieldValidator] = {
    "format": _format,
    "format_version": _format_version,
    "package_id": _package_id,
    "created": _created,
    "producer": _producer,
    "base_model": _base_model,
    "lora": _lora,
    "files": _files,
    "payload": _payload,
    "recipients": _recipients,
    "privacy_certificate": _privacy_certificate,
    "policy": _policy,
    "encrypted_adapter": _encrypted_adapter,
}


def validate_manifest(manifest: Any, *, error: type[TGSPError] = MalformedPackage) -> dict[str, Any]:
    """Check every field of a version-1 manifest; unsafe file paths raise :class:`UnsafePath`."""
    m = _keys(manifest, MANIFEST_KEYS, "the manifest", error)
    for name, validate in MANIFEST_FIELDS.items():
        validate(m[name], m, error)
    return m


def encode_manifest(manifest: Mapping[str, Any]) -> bytes:
    """The canonical bytes of a manifest (see :mod:`tensafe_tgsp._canonical`)."""
    return canonical_json(dict(manifest), error=PackError, what="manifest")


def decode_manifest(data: bytes) -> dict[str, Any]:
    """Parse and validate manifest bytes, which must be in canonical form."""
    return validate_manifest(load_json(data, error=MalformedPackage, what="manifest", canonical=True))
