"""`tensafe he pack` turns a PEFT adapter into an HE-encrypted TGSP package and a sealed key owner state;
`tensafe he seal-state` re-encrypts a state an earlier TenSafe wrote in the clear. Run through the CLI."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file

from tensafe.cli.main import cli
from tensafe.he import state as sealed_state
from tensafe.he_lora import ENCRYPTED_ADAPTER_FILE, PROTOCOL, Evaluator, InProcessTransport, KeyOwner
from tensafe.testing import fresh_plugin_manager
from tensafe_he_seal.backend import SealCKKSBackend

PASSPHRASE = "a passphrase for the key owner"


def peft_adapter(directory: Path) -> dict[str, tuple[Any, Any]]:
    rng = np.random.default_rng(0)
    weights = {name: (rng.normal(0, 0.05, (4, 64)), rng.normal(0, 0.05, (48, 4))) for name in ("q_proj", "v_proj")}
    tensors = {}
    for name, (a, b) in weights.items():
        prefix = f"base_model.model.model.layers.0.self_attn.{name}"
        tensors[f"{prefix}.lora_A.weight"] = a.astype(np.float32)
        tensors[f"{prefix}.lora_B.weight"] = b.astype(np.float32)
    directory.mkdir()
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "peft_type": "LORA"}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return weights


def invoke(*args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(cli, list(args), obj={"pm": fresh_plugin_manager(autoload=True)}, env=env)


def test_pack_writes_an_he_encrypted_package_and_a_sealed_state(tmp_path: Path) -> None:
    from tensafe_tgsp import keygen
    from tensafe_tgsp.loader import TGSPPackageLoader

    weights = peft_adapter(tmp_path / "adapter")
    producer, user = keygen(tmp_path / "keys", "producer"), keygen(tmp_path / "keys", "user")
    package, state = tmp_path / "adapter.tgsp", tmp_path / "owner.state"
    args = ["he", "pack", str(tmp_path / "adapter"), "-o", str(package), "--state", str(state)]
    args += ["--signing-key", str(producer["signing_key"]), "--recipient", str(user["recipient_public_key"])]
    result = invoke(*args, "--passphrase-env", "OWNER_PASS", env={"OWNER_PASS": PASSPHRASE})
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o600

    opened = tmp_path / "opened"
    manifest = TGSPPackageLoader().load(
        package,
        recipient_key=user["recipient_key"],
        trusted_signers=[producer["signing_public_key"]],
        destination=opened,
        base_model="tensafe-embedded-tiny-llama",
    )
    assert manifest["encrypted_adapter"]["protocol"] == PROTOCOL
    assert sorted(p.name for p in opened.iterdir()) == [ENCRYPTED_ADAPTER_FILE]  # no plaintext weights
    owner = KeyOwner.load(SealCKKSBackend(), state.read_bytes(), PASSPHRASE)
    evaluator = Evaluator(SealCKKSBackend(), (opened / ENCRYPTED_ADAPTER_FILE).read_bytes(), InProcessTransport(owner))
    a, b = weights["q_proj"]
    x = np.random.default_rng(1).normal(0, 1, (1, 64))
    expected = 2.0 * x @ a.astype(np.float32).T.astype(float) @ b.astype(np.float32).T.astype(float)
    assert np.max(np.abs(evaluator.delta("model.layers.0.self_attn.q_proj", x) - expected)) < 1e-5

    again = invoke(*args, "--passphrase-env", "OWNER_PASS", env={"OWNER_PASS": PASSPHRASE})
    assert again.exit_code == 2 and "already exists" in again.output


def test_pack_without_a_passphrase_is_a_clear_error(tmp_path: Path) -> None:
    peft_adapter(tmp_path / "adapter")
    key = tmp_path / "key"
    key.write_text("{}")
    result = invoke(
        "he", "pack", str(tmp_path / "adapter"), "-o", str(tmp_path / "a.tgsp"), "--state", str(tmp_path / "s"),
        "--signing-key", str(key), "--recipient", str(key), "--passphrase-env", "UNSET_VARIABLE",
    )  # fmt: skip
    assert result.exit_code == 2 and "UNSET_VARIABLE" in result.output and "Traceback" not in result.output


def test_seal_state_re_encrypts_an_unencrypted_state(tmp_path: Path) -> None:
    from tensafe.he_lora import in_process

    owner, _ = in_process(SealCKKSBackend, __import__("tensafe.config").config.HEConfig(), {})
    inner = sealed_state.unseal(owner.save(PASSPHRASE), PASSPHRASE)
    legacy = sealed_state.PLAIN_MAGIC + inner[len(b"TSHE-LORA-OWNER\x00") + 1 :]  # as TenSafe 0.2 wrote it
    old, new = tmp_path / "old.state", tmp_path / "new.state"
    old.write_bytes(legacy)
    with pytest.raises(sealed_state.KeyOwnerStateError, match="seal-state"):
        KeyOwner.load(SealCKKSBackend(), legacy, PASSPHRASE)
    result = invoke("he", "seal-state", str(old), str(new), "--passphrase-env", "P", env={"P": PASSPHRASE})
    assert result.exit_code == 0, result.output
    assert KeyOwner.load(SealCKKSBackend(), new.read_bytes(), PASSPHRASE).key_id == owner.key_id
    wrong = invoke("he", "seal-state", str(new), str(tmp_path / "x"), "--passphrase-env", "P", env={"P": "p"})
    assert wrong.exit_code == 2 and "not an unencrypted" in wrong.output
