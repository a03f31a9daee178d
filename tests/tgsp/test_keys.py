"""Key files: modes, passphrases, fingerprints, and refusal of anything malformed."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from tensafe_tgsp import format as fmt
from tensafe_tgsp import keys
from tensafe_tgsp.errors import DestinationExists, KeyFileError, TGSPError


@pytest.fixture
def umask_zero():
    previous = os.umask(0)
    yield
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.usefixtures("umask_zero")
def test_private_key_files_are_mode_0600(tmp_path: Path) -> None:
    paths = keys.keygen(tmp_path / "keys", "acme")
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == [
        "acme.recipient.key",
        "acme.recipient.pub",
        "acme.sign.key",
        "acme.sign.pub",
    ]
    assert mode(paths["signing_key"]) == 0o600 and mode(paths["recipient_key"]) == 0o600
    assert mode(paths["signing_public_key"]) == 0o644 and mode(paths["recipient_public_key"]) == 0o644


def test_keys_round_trip_with_stable_fingerprints(tmp_path: Path) -> None:
    paths = keys.keygen(tmp_path, "acme")
    signing = keys.load_signing_key(paths["signing_key"])
    recipient = keys.load_recipient_key(paths["recipient_key"])
    assert keys.load_signing_public_key(paths["signing_public_key"]) == signing.public_key()
    assert keys.load_recipient_public_key(paths["recipient_public_key"]) == recipient.public_key()
    document = json.loads(paths["signing_public_key"].read_text())
    assert document["kind"] == "tgsp-signing-public-key" and document["fingerprint"] == signing.fingerprint
    assert len(signing.fingerprint) == 64 and signing.fingerprint != recipient.fingerprint
    assert not keys.is_encrypted(paths["signing_key"])


def test_keygen_refuses_to_overwrite(tmp_path: Path) -> None:
    paths = keys.keygen(tmp_path, "acme")
    before = {p: p.read_bytes() for p in paths.values()}
    paths["recipient_public_key"].unlink()
    with pytest.raises(DestinationExists):
        keys.keygen(tmp_path, "acme")
    assert {p: p.read_bytes() for p in paths.values() if p.exists()} == {
        p: b for p, b in before.items() if p != paths["recipient_public_key"]
    }
    with pytest.raises(KeyFileError, match="invalid key name"):
        keys.keygen(tmp_path, "../escape")


def test_passphrase_protected_keys(tmp_path: Path, files: dict[str, bytes]) -> None:
    paths = keys.keygen(tmp_path, "secret", passphrase="correct horse battery staple")
    assert keys.is_encrypted(paths["signing_key"]) and keys.is_encrypted(paths["recipient_key"])
    text = paths["recipient_key"].read_text()
    assert '"encrypted":true' in text and "x25519" not in text
    with pytest.raises(KeyFileError, match="wrong passphrase"):
        keys.load_recipient_key(paths["recipient_key"], passphrase="incorrect horse")
    with pytest.raises(KeyFileError, match="passphrase-protected"):
        keys.load_signing_key(paths["signing_key"])
    signing = keys.load_signing_key(paths["signing_key"], passphrase="correct horse battery staple")
    assert signing.public_key() == keys.load_signing_public_key(paths["signing_public_key"])
    package = tmp_path / "p.tgsp"
    fmt.pack(
        files,
        package,
        signing_key=paths["signing_key"],
        passphrase="correct horse battery staple",
        recipients=[paths["recipient_public_key"]],
        base_model="m",
    )
    fmt.unpack(
        package,
        recipient_key=paths["recipient_key"],
        passphrase="correct horse battery staple",
        trusted_signers=[paths["signing_public_key"]],
        destination=tmp_path / "out",
    )
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == files["adapter_model.safetensors"]
    with pytest.raises(KeyFileError):
        fmt.unpack(
            package,
            recipient_key=paths["recipient_key"],
            passphrase="nope",
            trusted_signers=[paths["signing_public_key"]],
            destination=tmp_path / "out2",
        )
    assert not (tmp_path / "out2").exists()


def test_weakened_kdf_parameters_are_detected(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    keys.save_private_key(keys.SigningKey.generate(), path, passphrase="pw")
    document = json.loads(path.read_text())
    document["kdf"]["n"] = 2**14
    path.write_text(json.dumps(document))
    with pytest.raises(KeyFileError, match="wrong passphrase"):
        keys.load_signing_key(path, passphrase="pw")
    document["kdf"]["n"] = 2**30
    path.write_text(json.dumps(document))
    with pytest.raises(KeyFileError, match="out of the accepted range"):
        keys.load_signing_key(path, passphrase="pw")


def test_malformed_key_files_are_key_file_errors(tmp_path: Path) -> None:
    paths = keys.keygen(tmp_path, "acme")
    public = json.loads(paths["signing_public_key"].read_text())
    bad = tmp_path / "bad"
    cases = [
        b"",
        b"not json",
        b"[]",
        b'{"kind": "tgsp-signing-public-key", "version": 1, "kind": "x"}',
        json.dumps({**public, "version": 2}).encode(),
        json.dumps({**public, "fingerprint": "0" * 64}).encode(),
        json.dumps({**public, "ed25519": "AAAA"}).encode(),
        json.dumps({**public, "ml_dsa_65": "!!!"}).encode(),
        json.dumps({**public, "ed25519": None}).encode(),
        b"\xff\xfe",
        b"[" * 100_000,
        b" " * (70 * 1024),
    ]
    for content in cases:
        bad.write_bytes(content)
        with pytest.raises(KeyFileError):
            keys.load_signing_public_key(bad)
    with pytest.raises(KeyFileError, match="expected a tgsp-signing-public-key"):
        keys.load_signing_public_key(paths["recipient_public_key"])
    with pytest.raises(KeyFileError, match="expected a tgsp-recipient-private-key"):
        keys.load_recipient_key(paths["signing_key"])
    with pytest.raises(KeyFileError):
        keys.load_recipient_key(tmp_path / "missing.key")
    with pytest.raises(KeyFileError):
        keys.load_recipient_key(tmp_path)
    with pytest.raises(TGSPError):
        keys.save_public_key(keys.SigningKey.generate().public_key(), paths["signing_public_key"])
