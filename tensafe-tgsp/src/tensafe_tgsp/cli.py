"""``tensafe tgsp``: key generation and signed, encrypted adapter packages.

Every failure is a :class:`tensafe_tgsp.errors.TGSPError`, which the ``tensafe``
root command prints as one line and turns into exit status 2. Passphrases are
read from an environment variable named with ``--passphrase-env`` or typed at a
prompt, never given as an argument.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from tensafe_tgsp import format as tgsp_format
from tensafe_tgsp import keys
from tensafe_tgsp._canonical import load_json
from tensafe_tgsp._regular_file import open_regular_file
from tensafe_tgsp.errors import KeyFileError, PackError

if TYPE_CHECKING:
    from tensafe.engine.ledger import PrivacyCertificate

#: The base model recorded for runs on the ML backend's embedded default model.
EMBEDDED_BASE_MODEL = "tensafe-embedded-tiny-llama"
MAX_JSON_INPUT = 16 * 1024 * 1024

PATH_IN = click.Path(exists=True, dir_okay=False, path_type=Path)


def _env_passphrase(env_var: str | None) -> str | None:
    if not env_var:
        return None
    value = os.environ.get(env_var)
    if value is None:
        raise KeyFileError(f"environment variable {env_var} (from --passphrase-env) is not set")
    if not value:
        raise KeyFileError(f"environment variable {env_var} (from --passphrase-env) is empty")
    return value


def _key_passphrase(path: Path, env_var: str | None) -> str | None:
    """The passphrase for a private key file: from the environment, a prompt, or none if it is not encrypted."""
    passphrase = _env_passphrase(env_var)
    if passphrase is not None or not keys.is_encrypted(path):
        return passphrase
    if sys.stdin.isatty():
        value: str = click.prompt(f"Passphrase for {path}", hide_input=True)
        return value
    raise KeyFileError(
        f"{path} is passphrase-protected: pass --passphrase-env VAR, naming an environment variable that holds it"
    )


def _read_json(path: Path, what: str, *, strict: bool = True) -> Any:
    try:
        fd, _ = open_regular_file(path, what=what, error=PackError)
        with os.fdopen(fd, "rb") as handle:
            data = handle.read(MAX_JSON_INPUT + 1)
    except OSError as exc:
        raise PackError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_JSON_INPUT:
        raise PackError(f"{what} {path} is larger than {MAX_JSON_INPUT} bytes")
    if strict:
        return load_json(data, error=PackError, what=f"{what} {path}")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeError, ValueError, RecursionError) as exc:
        raise PackError(f"{what} {path} is not valid JSON: {exc}") from None


def _emit(as_json: bool, data: Any, text: str) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True) if as_json else text)


NOT_STATED = "not stated"
#: Certificate fields the summary describes, in the order it shows them.
STATED_FIELDS = (
    "target_epsilon",
    "mode",
    "privacy_unit",
    "sampling",
    "randomness",
    "protected_set",
    "caller_duties",
    "outside_guarantee",
)
NOT_PRIVATE = "reproducible noise: NOT private (whoever knows the seed can remove the noise; no DP guarantee)"


def _seeded(certificate: PrivacyCertificate) -> bool:
    """Whether the certificate says, in either of its two ways, that the noise was seeded."""
    randomness = (certificate.randomness or "").lower()
    return certificate.reproducible_noise is True or randomness.startswith("seeded") or "not private" in randomness


def privacy_statement(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """What a package's certificate states about its guarantee; None for a package without one.

    Every field of :data:`STATED_FIELDS` the certificate leaves out (an older
    tool made it) is null and named in ``not_stated``; ``warnings`` holds the
    reproducible-noise warning when the noise was seeded.
    """
    raw = manifest.get("privacy_certificate")
    if raw is None:
        return None
    certificate = tgsp_format.parse_certificate(raw)
    stated = certificate.to_json()
    statement: dict[str, Any] = {
        name: stated[name] if name in certificate.model_fields_set else None for name in STATED_FIELDS
    }
    statement["not_stated"] = [name for name in STATED_FIELDS if statement[name] is None]
    statement["reproducible_noise"] = _seeded(certificate)
    statement["warnings"] = [NOT_PRIVATE] if statement["reproducible_noise"] else []
    return statement


def _listed(label: str, items: list[str] | None) -> list[str]:
    if items is None:
        return [f"  {label:<18} {NOT_STATED}"]
    if not items:
        return [f"  {label:<18} none"]
    return [f"  {label}:"] + [f"    - {tgsp_format.one_line(item)}" for item in items]


def _privacy_lines(manifest: dict[str, Any]) -> list[str]:
    statement = privacy_statement(manifest)
    if statement is None:
        return ["privacy      NONE: no privacy certificate (not trained with differential privacy)"]
    cert = manifest["privacy_certificate"]
    parts = [f"epsilon {cert['epsilon']:.4g} at delta {cert['delta']:.3g}", f"{cert['accountant']} accountant"]
    parts.append(f"{cert['steps']} steps")
    for key, label in (("sampling_rate", "q"), ("noise_multiplier", "sigma"), ("max_grad_norm", "C")):
        if isinstance(cert.get(key), (int, float)):
            parts.append(f"{label}={cert[key]:.4g}")
    lines = ["privacy      " + ", ".join(parts)]
    lines.extend(f"  WARNING: {warning}" for warning in statement["warnings"])

    def line(label: str, value: Any) -> None:
        lines.append(f"  {label:<18} {NOT_STATED if value is None else tgsp_format.one_line(str(value))}")

    target = statement["target_epsilon"]
    line("target epsilon", None if target is None else f"{target:.4g}")
    line("mode", statement["mode"])
    line("privacy unit", statement["privacy_unit"])
    line("sampling", statement["sampling"])
    line("randomness", statement["randomness"])
    protected = statement["protected_set"]
    if protected is not None:
        source = f" from {protected['source']}" if protected.get("source") else ""
        protected = f"{protected['records']} records{source}, digest {protected['digest'][:28]}..."
    line("protected set", protected)
    lines.extend(_listed("caller duties", statement["caller_duties"]))
    lines.extend(_listed("outside guarantee", statement["outside_guarantee"]))
    audited = tgsp_format.parse_certificate(cert).audited
    if audited is not None:
        from tensafe.engine.report import render_audit

        lines.extend(f"  {tgsp_format.one_line(text)}" for text in render_audit(audited.model_dump(mode="json")))
    if cert.get("audit_chain_head"):
        lines.append(f"audit chain  {cert['audit_chain_head']}")
    return lines


def _shown(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest as ``--json`` prints it: the signed fields, plus what its certificate states."""
    return {**manifest, "privacy_statement": privacy_statement(manifest)}


def summary(manifest: dict[str, Any]) -> str:
    """A readable description of a manifest."""
    base = manifest["base_model"]
    extra = ", ".join(f"{k} {base[k]}" for k in ("sha256", "revision") if base.get(k))
    lines = [
        f"package      {manifest['package_id']} (TGSP v{manifest['format_version']}, created {manifest['created']})",
        f"producer     {manifest['producer']['fingerprint']}",
        f"base model   {base['id']}" + (f" ({extra})" if extra else ""),
        f"recipients   {len(manifest['recipients'])}: " + ", ".join(r[:16] for r in manifest["recipients"]),
        f"payload      {manifest['payload']['size']} bytes in {manifest['payload']['chunks']} "
        f"{manifest['payload']['aead']} chunks",
        f"files        {len(manifest['files'])}",
    ]
    for entry in manifest["files"]:
        lines.append(f"  {entry['size']:>12}  {entry['sha256'][:16]}  {entry['path']}")
    lines.extend(_privacy_lines(manifest))
    policy = manifest.get("policy")
    if policy:
        if policy.get("allowed_base_models"):
            lines.append("allowed for  " + ", ".join(policy["allowed_base_models"]))
        if policy.get("not_after"):
            lines.append(f"not after    {policy['not_after']}")
    if manifest.get("encrypted_adapter") is not None:
        lines.append(f"encrypted adapter  {json.dumps(manifest['encrypted_adapter'], sort_keys=True)}")
    return "\n".join(lines)


@click.group("tgsp")
def tgsp() -> None:
    """TGSP packages: signed (Ed25519 + ML-DSA-65), encrypted (X25519 + ML-KEM-768) adapters with their
    privacy certificate.

    \b
    Examples:
      tensafe tgsp keygen --out keys --name acme
      tensafe tgsp pack tensafe-runs/my-run --out adapter.tgsp \\
          --signing-key keys/acme.sign.key --recipient keys/customer.recipient.pub
      tensafe tgsp inspect adapter.tgsp
      tensafe tgsp verify adapter.tgsp --trusted keys/acme.sign.pub
      tensafe tgsp unpack adapter.tgsp --recipient-key keys/customer.recipient.key \\
          --trusted keys/acme.sign.pub --out adapter
    """


@tgsp.command("keygen")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Directory.")
@click.option("--name", default="tgsp", show_default=True, help="File name stem: NAME.sign.key, NAME.sign.pub, ...")
@click.option("--passphrase-env", metavar="VAR", help="Encrypt the private keys under the passphrase in $VAR.")
@click.option("--ask-passphrase", is_flag=True, help="Encrypt the private keys under a passphrase typed at a prompt.")
def keygen_cmd(out_dir: Path, name: str, passphrase_env: str | None, ask_passphrase: bool) -> None:
    """Write a signing key pair and a recipient key pair (private files with mode 0600; never overwrites)."""
    passphrase = _env_passphrase(passphrase_env)
    if passphrase is None and ask_passphrase:
        passphrase = click.prompt("Passphrase", hide_input=True, confirmation_prompt=True)
    paths = keys.keygen(out_dir, name, passphrase=passphrase)
    signing = keys.load_signing_public_key(paths["signing_public_key"])
    recipient = keys.load_recipient_public_key(paths["recipient_public_key"])
    click.echo(f"signing key    {paths['signing_key']} (private{', encrypted' if passphrase else ''})")
    click.echo(f"               {paths['signing_public_key']}  fingerprint {signing.fingerprint}")
    click.echo(f"recipient key  {paths['recipient_key']} (private{', encrypted' if passphrase else ''})")
    click.echo(f"               {paths['recipient_public_key']}  fingerprint {recipient.fingerprint}")
    if passphrase is None:
        click.echo("note: the private keys are not passphrase-protected; keep them secret", err=True)


def _mapping(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, dict) else {}


def _pack_inputs(source: Path) -> tuple[Path, dict[str, Any] | None, dict[str, Any], str | None]:
    """(adapter directory, privacy certificate, lora config, base model) for a run or PEFT adapter directory."""
    report_path, adapter_dir = source / "report.json", source / "adapter"
    if report_path.is_file() and adapter_dir.is_dir():
        report = _read_json(report_path, "run report", strict=False)
        if not isinstance(report, dict):
            raise PackError(f"{report_path} does not hold a run report")
        if report.get("status", "completed") != "completed":
            raise PackError(f"{report_path}: the run did not complete (status {report.get('status')!r})")
        config = _mapping(report.get("config"))
        lora, model = _mapping(config.get("lora")), _mapping(config.get("model"))
        certificate = report.get("privacy")
        if certificate is not None and not isinstance(certificate, dict):
            raise PackError(f"{report_path}: 'privacy' is not a certificate")
        return adapter_dir, certificate, lora, model.get("path") or EMBEDDED_BASE_MODEL
    config_path = source / "adapter_config.json"
    if config_path.is_file():
        adapter_config = _read_json(config_path, "adapter config", strict=False)
        if isinstance(adapter_config, dict):
            base = adapter_config.get("base_model_name_or_path")
            return source, None, adapter_config, base if isinstance(base, str) and base else None
    return source, None, {}, None


@tgsp.command("pack")
@click.argument("source_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Package.")
@click.option("--signing-key", required=True, type=PATH_IN, help="The producer's NAME.sign.key.")
@click.option("--recipient", "recipients", multiple=True, required=True, type=PATH_IN, help="NAME.recipient.pub.")
@click.option("--base-model", help="Base model id (default: from the run report or adapter_config.json).")
@click.option("--base-model-sha256", metavar="HEX", help="SHA-256 of the base model's weights.")
@click.option("--base-model-revision", help="Revision of the base model.")
@click.option("--certificate", type=PATH_IN, help="Privacy certificate JSON (default: the run report's 'privacy').")
@click.option("--allowed-base-model", "allowed", multiple=True, help="Policy: base models it may be loaded onto.")
@click.option("--not-after", help="Policy: last day (YYYY-MM-DD) or instant (ISO 8601 with zone) of validity.")
@click.option("--passphrase-env", metavar="VAR", help="Environment variable holding the signing key's passphrase.")
@click.option("--force", is_flag=True, help="Replace an existing output file.")
@click.option("--json", "as_json", is_flag=True, help="Print the signed manifest and its privacy statement as JSON.")
def pack_cmd(
    source_dir: Path,
    output: Path,
    signing_key: Path,
    recipients: tuple[Path, ...],
    base_model: str | None,
    base_model_sha256: str | None,
    base_model_revision: str | None,
    certificate: Path | None,
    allowed: tuple[str, ...],
    not_after: str | None,
    passphrase_env: str | None,
    force: bool,
    as_json: bool,
) -> None:
    """Sign and encrypt SOURCE_DIR (a PEFT adapter directory or a TenSafe run directory) into a package.

    From a run directory (report.json and adapter/), the adapter, the privacy
    certificate, the LoRA config and the base model come from the run.
    """
    adapter_dir, cert, lora, found_base = _pack_inputs(source_dir)
    if certificate is not None:
        cert = _read_json(certificate, "certificate")
        if not isinstance(cert, dict):
            raise PackError(f"{certificate} does not hold a JSON object")
    base = base_model or found_base
    if not base:
        raise PackError("give --base-model: SOURCE_DIR names no base model")
    key = keys.load_signing_key(signing_key, passphrase=_key_passphrase(signing_key, passphrase_env))
    manifest = tgsp_format.pack(
        adapter_dir,
        output,
        signing_key=key,
        recipients=list(recipients),
        base_model=base,
        base_model_sha256=base_model_sha256,
        base_model_revision=base_model_revision,
        lora_config=lora,
        privacy_certificate=cert,
        allowed_base_models=list(allowed) or None,
        not_after=not_after,
        overwrite=force,
    )
    if cert is None:
        click.echo("warning: the package carries no privacy certificate", err=True)
    _emit(as_json, _shown(manifest), f"wrote {output}\n" + summary(manifest))


#: What `verify` establishes (SPEC.md 9.1): everything but the payload, whose bytes no signature covers.
VERIFIED = (
    "the header and every region's length (the file's size included)",
    "both signatures (Ed25519 and ML-DSA-65) over the header, the manifest and the recipient block",
    "that the signer is one of the --trusted keys",
    "every manifest field, and the recipient block against the manifest's recipients",
    "the policy (not_after; the allowed base models, and --base-model when given)",
)
#: What `verify` leaves to `unpack`, which authenticates the payload as it decrypts it (SPEC.md 9.2).
NOT_VERIFIED = (
    "the payload (the encrypted adapter files): verify does not read it; only `tensafe tgsp unpack`, "
    "with a recipient key, authenticates it (the AES-GCM tag of every chunk, the SHA-256 of every file "
    "against the signed content index)",
)


def _verification_lines(package: Path, manifest: dict[str, Any]) -> list[str]:
    """What verify says before the summary (``verify --help`` words the same items)."""
    lines = [f"OK: {package} is signed by trusted key {manifest['producer']['fingerprint']}", "verified:"]
    lines.extend(f"  - {item}" for item in VERIFIED)
    lines.append("NOT verified:")
    lines.extend(f"  - {item}" for item in NOT_VERIFIED)
    return lines


@tgsp.command("verify")
@click.argument("package", type=PATH_IN)
@click.option("--trusted", "trusted", multiple=True, required=True, type=PATH_IN, help="A trusted NAME.sign.pub.")
@click.option("--base-model", help="Also check that the policy allows this base model.")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the verified manifest, its privacy statement and what was (not) verified as JSON.",
)
def verify_cmd(package: Path, trusted: tuple[Path, ...], base_model: str | None, as_json: bool) -> None:
    """Check signatures, signer, manifest and policy, without decrypting: the payload is NOT verified.

    \b
    Verified:
      - the header and every region's length (the file's size included)
      - both signatures (Ed25519 and ML-DSA-65) over the header, the
        manifest and the recipient block
      - that the signer is one of the --trusted keys
      - every manifest field, and the recipient block against the
        manifest's recipients
      - the policy (not_after; the allowed base models, and --base-model
        when given)

    \b
    NOT verified:
      - the payload (the encrypted adapter files): verify does not read it;
        only `tensafe tgsp unpack`, with a recipient key, authenticates it
        (the AES-GCM tag of every chunk, the SHA-256 of every file against
        the signed content index)
    """
    manifest = tgsp_format.verify(package, list(trusted), base_model=base_model)
    shown = {**_shown(manifest), "verification": {"verified": list(VERIFIED), "not_verified": list(NOT_VERIFIED)}}
    _emit(as_json, shown, "\n".join([*_verification_lines(package, manifest), summary(manifest)]))


@tgsp.command("inspect")
@click.argument("package", type=PATH_IN)
@click.option("--json", "as_json", is_flag=True, help="Print the manifest and its privacy statement as JSON.")
def inspect_cmd(package: Path, as_json: bool) -> None:
    """Show a package's manifest and privacy certificate WITHOUT verifying it (use `verify` to trust it)."""
    manifest = tgsp_format.inspect(package)
    _emit(
        as_json,
        _shown(manifest),
        "UNVERIFIED: inspect checks no signature; run `tensafe tgsp verify` before trusting any of this.\n"
        + summary(manifest),
    )


@tgsp.command("unpack")
@click.argument("package", type=PATH_IN)
@click.option("--recipient-key", required=True, type=PATH_IN, help="Your NAME.recipient.key.")
@click.option("--trusted", "trusted", multiple=True, required=True, type=PATH_IN, help="A trusted NAME.sign.pub.")
@click.option("--out", "destination", required=True, type=click.Path(path_type=Path), help="New or empty directory.")
@click.option("--passphrase-env", metavar="VAR", help="Environment variable holding the recipient key's passphrase.")
@click.option("--base-model", help="Also check that the policy allows this base model.")
@click.option("--json", "as_json", is_flag=True, help="Print the verified manifest and its privacy statement as JSON.")
def unpack_cmd(
    package: Path,
    recipient_key: Path,
    trusted: tuple[Path, ...],
    destination: Path,
    passphrase_env: str | None,
    base_model: str | None,
    as_json: bool,
) -> None:
    """Verify, then decrypt the adapter into a new directory; nothing is written unless every check passes."""
    key = keys.load_recipient_key(recipient_key, passphrase=_key_passphrase(recipient_key, passphrase_env))
    manifest = tgsp_format.unpack(
        package, recipient_key=key, trusted_signers=list(trusted), destination=destination, base_model=base_model
    )
    _emit(
        as_json, _shown(manifest), f"unpacked {len(manifest['files'])} files into {destination}\n" + summary(manifest)
    )
