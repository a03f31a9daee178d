"""HE-LoRA on the embedded tiny model: same logits (within 1e-3) and greedy tokens as plaintext LoRA,
through the torch backend, the orchestrator, `tensafe inference --he` and a TGSP package whose adapter is
HE-encrypted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tensafe.config import DPConfig, HEConfig, RunConfig, build_config
from tensafe.errors import UsageError
from tensafe.he_lora import ENCRYPTED_ADAPTER_FILE, KeyOwner, adapter_marker, in_process
from tensafe.orchestrator import TenSafeOrchestrator
from tensafe.testing import fresh_plugin_manager
from tensafe.types import AdamParams, SamplingParams, datum_from_sequence
from tensafe_he_seal.backend import SealCKKSBackend
from tensafe_torch.backend import TorchBackend

LOGIT_BOUND = 1e-3
PROMPT = "Record 1. Name:"
LORA = {"rank": 4, "seed": 0, "target_modules": ["q_proj", "v_proj"]}


def config() -> RunConfig:
    return RunConfig(backend="torch", dp=DPConfig(enabled=False), lora=LORA, training={"seed": 0})


def torch_backend() -> TorchBackend:
    backend = fresh_plugin_manager(autoload=True).registry.ml_backend("torch")
    assert isinstance(backend, TorchBackend)
    backend.initialize_model(config())
    return backend


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter trained a few steps, so that it changes the model's outputs."""
    backend = torch_backend()
    data = [datum_from_sequence(backend.encode("Record 1. Name: Ada Costa. Born: 1950. City: Lyon."))]
    for _ in range(2):
        backend.forward_backward(data, "cross_entropy")
        backend.optim_step(AdamParams(learning_rate=0.05))
    directory = tmp_path_factory.mktemp("adapter")
    backend.export_adapter(directory)
    return directory


def logits(backend: TorchBackend, ids: list[int]) -> torch.Tensor:
    backend._peft.eval()
    with torch.no_grad():
        return backend._peft(input_ids=torch.tensor([ids])).logits[0]


def test_logits_and_greedy_tokens_match_plaintext_lora(adapter: Path) -> None:
    plain = torch_backend()
    plain.load_adapter(adapter)
    served = torch_backend()  # the evaluator's model: base weights only, its own adapter disabled
    _, evaluator = in_process(SealCKKSBackend, HEConfig(), served.read_lora(adapter))
    ids = plain.encode(PROMPT)
    expected = logits(plain, ids)
    with served.lora_delta(evaluator.modules, evaluator.delta):
        encrypted = logits(served, ids)
    base = logits(torch_backend(), ids)
    assert float((expected - base).abs().max()) > 1e-2  # the adapter matters ...
    assert float((encrypted - expected).abs().max()) <= LOGIT_BOUND  # ... and HE reproduces it
    greedy = SamplingParams(max_tokens=32, temperature=0.0, stop=[])
    want = plain.sample([ids], greedy)[0].sequences[0].tokens
    with served.lora_delta(evaluator.modules, evaluator.delta):
        got = served.sample([ids], greedy)[0].sequences[0].tokens
    assert len(want) == 32 and got == want
    assert evaluator.stats["rotations"] == 0 and not evaluator.backend.has_key("secret")


def orchestrator(**extra: Any) -> TenSafeOrchestrator:
    data = {"backend": "torch", "sampling": {"max_tokens": 12, "temperature": 0.0}, **extra}
    return TenSafeOrchestrator(build_config(data, environ={}), plugin_manager=fresh_plugin_manager(autoload=True))


def test_orchestrator_generates_the_same_text_under_he(adapter: Path) -> None:
    plain = orchestrator().generate([PROMPT], adapter=adapter)[0].sequences[0]
    he = orchestrator().generate([PROMPT], adapter=adapter, he=True)[0].sequences[0]
    assert he.tokens == plain.tokens
    assert "".join(orchestrator().stream(PROMPT, adapter=adapter, he=True)) == plain.text
    with pytest.raises(UsageError, match="adapter"):
        orchestrator().generate([PROMPT], he=True)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TENSAFE_STRICT_PLUGINS": "1"}
    command = [sys.executable, "-m", "tensafe.cli.main", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)


def test_cli_inference_he(adapter: Path) -> None:
    he = cli("inference", "-p", PROMPT, "--adapter", str(adapter), "--max-tokens", "12", "--temperature", "0", "--he")
    assert he.returncode == 0, he.stderr
    plain = orchestrator().generate([PROMPT], adapter=adapter)[0].sequences[0].text
    assert he.stdout == PROMPT + plain + "\n" and plain.strip()


def test_tgsp_package_with_an_he_encrypted_adapter(
    adapter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tensafe_tgsp import keygen
    from tensafe_tgsp.loader import TGSPPackageLoader

    producer, user = keygen(tmp_path / "keys", "producer"), keygen(tmp_path / "keys", "user")
    # The adapter owner encrypts; the package carries ciphertexts and the public key, never A or B.
    owner = KeyOwner.create(SealCKKSBackend(), HEConfig())
    encrypted = owner.encrypt_adapter(torch_backend().read_lora(adapter))
    (tmp_path / "he").mkdir()
    (tmp_path / "he" / ENCRYPTED_ADAPTER_FILE).write_bytes(encrypted)
    state = tmp_path / "owner.state"
    state.write_bytes(owner.save("key owner passphrase"))  # sealed at rest; opened with $TENSAFE_HE_PASSPHRASE
    monkeypatch.setenv("TENSAFE_HE_PASSPHRASE", "key owner passphrase")
    package = tmp_path / "adapter.tgsp"
    TGSPPackageLoader().pack(
        tmp_path / "he",
        package,
        signing_key=producer["signing_key"],
        recipients=[user["recipient_public_key"]],
        base_model="tensafe-embedded-tiny-llama",
        lora_config=LORA,
        encrypted_adapter=adapter_marker(encrypted, "seal-ckks"),
    )
    tgsp = {"recipient_key": str(user["recipient_key"]), "trusted_signers": [str(producer["signing_public_key"])]}
    served = orchestrator(tgsp=tgsp, he={"key_owner_state": str(state)})
    he = served.generate([PROMPT], adapter=package, he=True)[0].sequences[0]
    assert he.tokens == orchestrator().generate([PROMPT], adapter=adapter)[0].sequences[0].tokens
    # The key owner's decryption count went back into its sealed state: the rotation limit holds across runs.
    assert KeyOwner.load(SealCKKSBackend(), state.read_bytes(), "key owner passphrase").decryptions > 0
    assert state.stat().st_mode & 0o777 == 0o600
    with pytest.raises(UsageError, match="HE-encrypted"):
        orchestrator(tgsp=tgsp).generate([PROMPT], adapter=package)
    with pytest.raises(UsageError, match="key_owner_state"):
        orchestrator(tgsp=tgsp).generate([PROMPT], adapter=package, he=True)
    assert np.isfinite(he.logprobs).all()
