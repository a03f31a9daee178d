"""HE-LoRA's stated guarantees, each tested: the key owner's state sealed at rest, its secret key in no frame,
the flood above the decoder's rounding, the decryption limit, the hiding bound, one round per token, the pool."""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tensafe.config import HEConfig
from tensafe.errors import TensafeError
from tensafe.he import frames, hiding
from tensafe.he import state as sealed_state
from tensafe.he.pool import MaskPool
from tensafe.he_lora import (
    FLOOD_BITS,
    Evaluator,
    InProcessTransport,
    KeyOwner,
    KeyRotationRequired,
    LoraRequest,
    in_process,
    open_encrypted,
)
from tensafe_he_seal.backend import SealCKKSBackend

DELTA_BOUND = 1e-5
PASSPHRASE = "correct horse battery staple"


def adapter(d_in: int, d_out: int, rank: int, seed: int = 0) -> tuple[Any, Any, float]:
    rng = np.random.default_rng(seed)
    return rng.normal(0, 0.05, (rank, d_in)), rng.normal(0, 0.05, (d_out, rank)), 2.0


@pytest.fixture(scope="module")
def parties() -> tuple[KeyOwner, Evaluator, dict[str, tuple[Any, Any, float]]]:
    modules = {"q": adapter(128, 96, 8), "v": adapter(128, 64, 8, 1)}
    owner, evaluator = in_process(SealCKKSBackend, HEConfig(), modules)
    return owner, evaluator, modules


def test_sealed_state_holds_neither_the_secret_key_nor_b(parties: Any, tmp_path: Path) -> None:
    owner, _, modules = parties
    path = tmp_path / "owner.state"
    sealed_state.write_new(path, owner.save(PASSPHRASE))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    on_disk = path.read_bytes()
    secret = owner.backend.serialize_key("secret")
    assert all(secret[i : i + 32] not in on_disk for i in range(64, len(secret) - 32, len(secret) // 50))
    for _, b, _ in modules.values():
        assert np.ascontiguousarray(b, "<f8").tobytes()[:64] not in on_disk
        assert b"%.6f" % b[0, 0] not in on_disk
    reopened = KeyOwner.load(SealCKKSBackend(), on_disk, PASSPHRASE)
    assert reopened.key_id == owner.key_id
    with pytest.raises(TensafeError, match="already exists"):
        sealed_state.write_new(path, b"x")


def test_wrong_passphrase_and_unencrypted_state_are_clear_errors(parties: Any) -> None:
    owner, _, _ = parties
    sealed = owner.save(PASSPHRASE)
    with pytest.raises(sealed_state.KeyOwnerStateError, match="wrong passphrase"):
        KeyOwner.load(SealCKKSBackend(), sealed, "not it")
    with pytest.raises(sealed_state.KeyOwnerStateError, match="passphrase-protected"):
        KeyOwner.load(SealCKKSBackend(), sealed, None)
    altered = bytearray(sealed)
    altered[-5] ^= 1
    with pytest.raises(sealed_state.KeyOwnerStateError, match="altered"):
        KeyOwner.load(SealCKKSBackend(), bytes(altered), PASSPHRASE)
    legacy = sealed_state.PLAIN_MAGIC + b"\x00" * 64  # how TenSafe 0.2 began its unencrypted states
    with pytest.raises(sealed_state.KeyOwnerStateError, match="tensafe he seal-state"):
        KeyOwner.load(SealCKKSBackend(), legacy, PASSPHRASE)


def test_open_encrypted_takes_the_passphrase_from_the_environment(
    parties: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    owner, _, modules = parties
    adapter_bytes = owner.encrypt_adapter(modules)
    monkeypatch.setenv(sealed_state.PASSPHRASE_ENV, PASSPHRASE)
    evaluator = open_encrypted(SealCKKSBackend, adapter_bytes, owner.save(PASSPHRASE))
    a, b, s = modules["q"]
    x = np.ones((1, 128))
    assert np.max(np.abs(evaluator.delta("q", x) - s * x @ a.T @ b.T)) < DELTA_BOUND


def test_key_owner_refuses_to_put_its_secret_key_in_a_frame(parties: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    owner, _, modules = parties
    leaked = owner.backend.serialize_key("secret")
    monkeypatch.setattr(owner.backend, "serialize_context", lambda: leaked)
    with pytest.raises(TensafeError, match="secret key"):
        owner.encrypt_adapter(modules)


def test_frames_are_versioned_and_size_checked(parties: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    owner, evaluator, _ = parties
    request, _ = evaluator.request("q", np.ones((1, 128)))
    data = bytearray(request.to_bytes())
    data[len(b"TSHE-LORA-REQ\x00")] = 1  # a version-1 frame
    with pytest.raises(TensafeError, match="version 1"):
        owner.handle(bytes(data))
    with pytest.raises(TensafeError, match="truncated"):
        owner.handle(request.to_bytes()[:-1])
    monkeypatch.setattr(frames, "MAX_FRAME", 1024)
    with pytest.raises(TensafeError, match="larger than 1024 bytes"):
        owner.handle(request.to_bytes())


def test_flood_dominates_the_decoders_rounding(parties: Any) -> None:
    owner, evaluator, modules = parties
    x = np.random.default_rng(1).normal(0, 1, (4, 128))
    request, unmask = evaluator.request("q", x)
    a, b, _ = modules["q"]
    rounding = owner.unflooded(LoraRequest.from_bytes(request.to_bytes()))["q"] + unmask - x @ a.T @ b.T
    assert np.max(np.abs(rounding)) < 2.0 ** (FLOOD_BITS - 4)  # the flood's half-width is 2^FLOOD_BITS


def test_key_owner_refuses_past_its_decryption_limit_and_rotates(parties: Any) -> None:
    _, _, modules = parties
    owner, evaluator = in_process(SealCKKSBackend, HEConfig(), {"q": modules["q"]})
    owner.decryption_limit = 4  # "q" needs 2 ciphertexts per token
    x = np.ones((2, 128))
    evaluator.delta("q", x)
    restarted = KeyOwner.load(SealCKKSBackend(), owner.save(PASSPHRASE), PASSPHRASE)
    assert restarted.decryptions == 4 and restarted.decryption_limit == 4  # a restart does not reset the count
    with pytest.raises(KeyRotationRequired, match="rotate"):
        evaluator.delta("q", x)
    old_key = owner.key_id
    rotated = owner.rotate(owner.encrypt_adapter({"q": modules["q"]}))
    assert owner.key_id != old_key and owner.decryptions == 0
    fresh = Evaluator(SealCKKSBackend(), rotated, InProcessTransport(owner))
    a, b, s = modules["q"]
    assert np.max(np.abs(fresh.delta("q", x) - s * x @ a.T @ b.T)) < DELTA_BOUND


def test_stated_hiding_bound_holds_for_the_code_parameters() -> None:
    """THREAT_MODEL.md's figures, recomputed from the default masks and the reference module."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 0.02, (16, 4096)), rng.normal(0, 0.02, (4096, 16))
    norms = hiding.AdapterNorms.of(a, b, 4096)
    per = hiding.distance_squared(norms, hiding.MaskBits(), math.sqrt(4096))
    assert hiding.total_variation(per) < hiding.STATED_TOKEN_MODULE
    assert hiding.total_variation(per * hiding.STATED_TOKENS) < hiding.STATED_MODULE_OVER_TOKENS
    session = per * hiding.STATED_TOKENS * hiding.STATED_MODULES
    assert hiding.total_variation(session) < hiding.STATED_SESSION


def test_gaussian_masks_have_the_stated_spread() -> None:
    draws = hiding.gaussian((200_000,), 10)
    assert abs(float(np.std(draws)) / 2**10 - 1) < 0.01 and abs(float(np.mean(draws))) < 2**10 * 0.01


def test_evaluator_accounts_the_bound_and_refuses_past_its_limit(parties: Any) -> None:
    owner, _, modules = parties
    evaluator = Evaluator(SealCKKSBackend(), owner.encrypt_adapter(modules), InProcessTransport(owner))
    x = np.random.default_rng(2).normal(0, 1, (3, 128))
    evaluator.deltas({"q": x, "v": x})
    report = evaluator.hiding.report()
    norms = evaluator.modules["q"].norms
    expected = sum(hiding.distance_squared(norms, evaluator.masks, float(n)) for n in np.linalg.norm(x, axis=1))
    assert math.isclose(report["modules"]["q"], hiding.total_variation(expected))
    assert report["session"] > report["modules"]["q"] and report["token_module_answers"] == 6
    evaluator.hiding.limit = report["session"] * 1.01
    decrypted = owner.decryptions
    with pytest.raises(hiding.HidingBudgetExceeded, match="limit"):
        evaluator.delta("q", x)
    assert owner.decryptions == decrypted  # refused before anything was sent


def test_all_modules_of_a_token_take_one_round_trip(parties: Any) -> None:
    owner, _, modules = parties
    transport = InProcessTransport(owner)
    evaluator = Evaluator(SealCKKSBackend(), owner.encrypt_adapter(modules), transport)
    x = np.random.default_rng(3).normal(0, 1, (1, 128))
    deltas = evaluator.deltas({"q": x, "v": x})
    assert transport.rounds == 1
    for name, (a, b, s) in modules.items():
        assert np.max(np.abs(deltas[name] - s * x @ a.T @ b.T)) < DELTA_BOUND


def test_adapter_at_an_unexpected_scale_is_refused(parties: Any) -> None:
    owner, evaluator, _ = parties
    backend = owner.backend
    ct = backend.encrypt(np.ones(4), scale_bits=evaluator.adapter_bits - 8)  # A inflated by 2^8 at decryption
    with pytest.raises(TensafeError, match="scale"):
        evaluator._maker._adapter_ct(backend.serialize_ciphertext(ct))


def test_activations_beyond_the_value_room_are_refused(parties: Any) -> None:
    _, evaluator, _ = parties
    with pytest.raises(TensafeError, match="value room"):
        evaluator.delta("q", np.full((1, 128), 2.0**33))


def test_mask_pool_pads_are_used_once_and_give_the_delta(parties: Any) -> None:
    owner, _, modules = parties
    adapter_bytes = owner.encrypt_adapter(modules)
    with MaskPool(SealCKKSBackend, adapter_bytes, workers=1, depth=2) as pool:
        evaluator = Evaluator(SealCKKSBackend(), adapter_bytes, InProcessTransport(owner), pool=pool)
        x = np.random.default_rng(4).normal(0, 1, (3, 128))
        a, b, s = modules["q"]
        assert np.max(np.abs(evaluator.delta("q", x) - s * x @ a.T @ b.T)) < DELTA_BOUND
        assert pool.taken == 3
        first, second = pool.take("v"), pool.take("v")
        assert first != second  # fresh masks every time


def test_a_rescaling_key_owner_is_undetectable_and_sees_activations(parties: Any) -> None:
    """THREAT_MODEL.md, "Malicious behaviour": (lambda A, B / lambda) computes the same delta, the evaluator
    cannot tell, and the key owner's decrypted slots then track A x slot by slot. Declared norms that tell the
    truth make the evaluator's bound show it; a lie about them is undetectable without norm proofs."""
    from tensafe.he.frames import ADAPTER, pack_frame, read_frame

    owner, honest, modules = parties
    a, b, s = modules["q"]
    scale = 2.0**24
    rescaled = owner.encrypt_adapter({"q": (a * scale, b / scale, s)})
    header, blobs = read_frame(ADAPTER, rescaled, "adapter")
    header["modules"][0]["norms"] = honest.modules["q"].norms.to_json()  # the lie
    del header["blobs"]
    lying = Evaluator(SealCKKSBackend(), pack_frame(ADAPTER, header, blobs), InProcessTransport(owner))
    x = np.random.default_rng(5).normal(0, 1, (1, 128))
    assert np.max(np.abs(lying.delta("q", x) - s * x @ a.T @ b.T)) < DELTA_BOUND  # same function: undetectable
    assert lying.hiding.report()["session"] < 1e-3  # the bound believes the declared norms
    request, _ = lying.request("q", x)
    seen = owner.backend.decrypt(owner.backend.deserialize_ciphertext(request.parts[0].rows[0][0]))
    truth = (a * scale)[0] * x[0]  # row 0 sits in the first 128 slots
    assert np.corrcoef(seen[:128], truth)[0, 1] > 0.6
    truthful = Evaluator(SealCKKSBackend(), rescaled, InProcessTransport(owner))
    truthful.delta("q", x)
    assert truthful.hiding.report()["session"] > 1.0  # declared truthfully, the bound says: nothing is hidden
