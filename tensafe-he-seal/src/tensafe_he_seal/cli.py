"""``tensafe he``: HE-encrypted adapter packages and the key owner's sealed state.

``tensafe he pack`` reads a PEFT LoRA adapter, encrypts it under fresh CKKS
keys (:mod:`tensafe.he_lora`), signs and encrypts the result as a TGSP package
through the registered TGSP loader, and writes the key owner's state, sealed
under a passphrase, to a new file with mode 0600. ``tensafe he seal-state``
re-encrypts a state an earlier TenSafe wrote in the clear. Passphrases come
from an environment variable named with ``--passphrase-env`` (default
``TENSAFE_HE_PASSPHRASE``) or a prompt, never from an argument.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any, cast

import click

from tensafe.cli.context import plugin_manager
from tensafe.config import HEConfig, LoraConfig
from tensafe.errors import UsageError
from tensafe.he import state as sealed_state
from tensafe.he.peft import read_peft_lora

PATH_IN = click.Path(exists=True, dir_okay=False, path_type=Path)
#: The base model recorded when none is named (the ML backend's embedded default model).
EMBEDDED_BASE_MODEL = "tensafe-embedded-tiny-llama"


def _passphrase(env_var: str | None, *, confirm: bool) -> str:
    value = sealed_state.passphrase_from_env(env_var)
    if value is not None:
        return value
    if sys.stdin.isatty():
        typed: str = click.prompt("Key owner passphrase", hide_input=True, confirmation_prompt=confirm)
        return typed
    raise UsageError(
        f"the key owner's state is sealed under a passphrase: set {sealed_state.PASSPHRASE_ENV}, "
        "or pass --passphrase-env VAR naming an environment variable that holds it"
    )


@click.group("he")
def he() -> None:
    """HE-encrypted adapters: package one for an evaluator, seal the key owner's state."""


@he.command("pack")
@click.argument("adapter", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True, help="The .tgsp.")
@click.option("--state", type=click.Path(dir_okay=False, path_type=Path), required=True, help="New key owner state.")
@click.option("--signing-key", type=PATH_IN, required=True, help="Your private TGSP signing key.")
@click.option("--recipient", "recipients", type=PATH_IN, multiple=True, required=True, help="Recipient public key.")
@click.option("--base-model", default=EMBEDDED_BASE_MODEL, show_default=True, help="Base model the adapter is for.")
@click.option("--he-backend", default="seal-ckks", show_default=True, help="Registered HE backend.")
@click.option("--passphrase-env", metavar="VAR", help="Seal the state under the passphrase in $VAR.")
@click.option("--signing-passphrase-env", metavar="VAR", help="The signing key's passphrase is in $VAR.")
@click.pass_context
def pack_cmd(
    ctx: click.Context,
    adapter: Path,
    output: Path,
    state: Path,
    signing_key: Path,
    recipients: tuple[Path, ...],
    base_model: str,
    he_backend: str,
    passphrase_env: str | None,
    signing_passphrase_env: str | None,
) -> None:
    """Encrypt a PEFT LoRA adapter under fresh CKKS keys and package it as a signed, encrypted TGSP.

    The package holds the encrypted adapter and the public key only; the secret
    key and B go to --state, sealed under a passphrase (file mode 0600).
    """
    from tensafe.he_lora import ENCRYPTED_ADAPTER_FILE, KeyOwner, adapter_marker

    if state.exists():
        raise UsageError(f"{state} already exists; refusing to overwrite a key owner state")
    passphrase = _passphrase(passphrase_env, confirm=True)
    signing_passphrase = sealed_state.passphrase_from_env(signing_passphrase_env) if signing_passphrase_env else None
    modules, peft = read_peft_lora(adapter)
    registry = plugin_manager(ctx).registry
    config = HEConfig(backend=he_backend)
    owner = KeyOwner.create(registry.he_backend(he_backend), config)
    encrypted = owner.encrypt_adapter(modules)
    lora = LoraConfig(
        rank=int(peft["r"]), alpha=float(peft["lora_alpha"]), target_modules=peft.get("target_modules") or None
    )
    loader = cast(Any, registry.tgsp_loader("tgsp"))
    sealed_state.write_new(state, owner.save(passphrase))
    with tempfile.TemporaryDirectory(prefix="tensafe-he-pack-") as scratch:
        (Path(scratch) / ENCRYPTED_ADAPTER_FILE).write_bytes(encrypted)
        try:
            manifest = loader.pack(
                Path(scratch),
                output,
                signing_key=signing_key,
                recipients=list(recipients),
                base_model=base_model,
                lora_config=lora.model_dump(mode="json"),
                passphrase=signing_passphrase,
                encrypted_adapter=adapter_marker(encrypted, he_backend),
            )
        except BaseException:
            state.unlink(missing_ok=True)  # a state without its package is of no use
            raise
    click.echo(f"package          {output} ({manifest.get('package_id')})")
    click.echo(f"key owner state  {state} (sealed, mode 0600; keep it and its passphrase secret)")
    click.echo(f"modules          {', '.join(sorted(modules))}; key id {owner.key_id}")


@he.command("seal-state")
@click.argument("old", type=PATH_IN)
@click.argument("new", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--passphrase-env", metavar="VAR", help="Seal the state under the passphrase in $VAR.")
def seal_state_cmd(old: Path, new: Path, passphrase_env: str | None) -> None:
    """Re-encrypt a key owner state that an earlier TenSafe wrote unencrypted (then delete OLD yourself)."""
    from tensafe.he_lora import seal_unencrypted_state

    sealed = seal_unencrypted_state(old.read_bytes(), _passphrase(passphrase_env, confirm=True))
    sealed_state.write_new(new, sealed)
    click.echo(f"{new}: sealed (mode 0600). Delete {old}: it holds the secret key in the clear.")
