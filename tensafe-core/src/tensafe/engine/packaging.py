"""TGSP packages: sign and encrypt an adapter with its privacy certificate, and open one for inference."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from tensafe.errors import UsageError

if TYPE_CHECKING:
    from tensafe.config import RunConfig
    from tensafe.engine.gate import StepGate
    from tensafe.engine.ledger import PrivacyCertificate
    from tensafe.registry import Registry

EMBEDDED_MODEL_ID = "tensafe-embedded-tiny-llama"


def base_model_id(config: RunConfig) -> str:
    """How packages name the base model: its path or hub id, or the embedded model's id."""
    return config.model.path or EMBEDDED_MODEL_ID


def packaging_configured(config: RunConfig) -> bool:
    return config.tgsp is not None and config.tgsp.signing_key is not None


def check_packaging(config: RunConfig, registry: Registry) -> None:
    """Fail before training, not after it, when a configured package cannot be written."""
    if not packaging_configured(config):
        return
    tgsp = config.tgsp
    assert tgsp is not None and tgsp.signing_key is not None
    if not tgsp.recipients:
        raise UsageError("tgsp.recipients: name at least one recipient public key to encrypt the package to")
    for key in (tgsp.signing_key, *tgsp.recipients):
        if not key.is_file():
            raise UsageError(f"key file not found: {key}")
    registry.registration("tgsp_loader", tgsp.loader)


def package_adapter(
    gate: StepGate,
    registry: Registry,
    config: RunConfig,
    adapter_dir: Path,
    output: Path,
    certificate: PrivacyCertificate | None,
) -> dict[str, Any]:
    """Sign and encrypt an exported adapter with its privacy certificate."""
    tgsp = config.tgsp
    if tgsp is None or tgsp.signing_key is None:
        raise UsageError("packaging needs tgsp.signing_key and tgsp.recipients in the config")
    loader = registry.tgsp_loader(tgsp.loader)
    manifest = loader.pack(
        adapter_dir,
        output,
        signing_key=tgsp.signing_key,
        recipients=tgsp.recipients,
        base_model=base_model_id(config),
        lora_config=config.lora.model_dump(),
        privacy_certificate=certificate.to_json() if certificate is not None else None,
    )
    gate.audit("artifact.package", str(output), package_id=manifest.get("package_id"))
    return {"path": str(output), "package_id": manifest.get("package_id")}


def open_package(
    gate: StepGate,
    registry: Registry,
    config: RunConfig,
    package: Path,
    destination: Path,
    allow_untrusted_signer: bool,
) -> dict[str, Any]:
    """Verify a package (signatures, hashes, policy) and decrypt its adapter into ``destination``."""
    tgsp = config.tgsp
    if tgsp is None or tgsp.recipient_key is None:
        raise UsageError("opening a .tgsp package needs your recipient key (tgsp.recipient_key / --recipient-key)")
    if not tgsp.trusted_signers and not allow_untrusted_signer:
        raise UsageError("opening a .tgsp package needs the signer keys you trust (tgsp.trusted_signers / --trusted)")
    loader = registry.tgsp_loader(tgsp.loader)
    manifest = loader.load(
        package,
        recipient_key=tgsp.recipient_key,
        trusted_signers=tgsp.trusted_signers,
        destination=destination,
        allow_untrusted_signer=allow_untrusted_signer,
        base_model=base_model_id(config),
    )
    gate.audit(
        "artifact.open",
        str(package),
        package_id=manifest.get("package_id"),
        untrusted_signer_allowed=allow_untrusted_signer,
    )
    return manifest
