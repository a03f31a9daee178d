"""``tensafe tgsp keygen | pack | inspect | verify | unpack`` through the real command line."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tensafe_tgsp.cli import NOT_VERIFIED, VERIFIED
from tests.tgsp.helpers import CERTIFICATE, Party, adapter_files


def tgsp(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TENSAFE_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "tensafe.cli.main", "tgsp", *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        stdin=subprocess.DEVNULL,
        timeout=120,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def fails(result: subprocess.CompletedProcess[str], message: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TenSafe run directory, as `tensafe run` leaves it (NaN in the history, as real reports may have)."""
    run = tmp_path_factory.mktemp("run")
    (run / "adapter").mkdir()
    for name, data in adapter_files().items():
        (run / "adapter" / name).write_bytes(data)
    report = {
        "run_id": "abc",
        "status": "completed",
        "privacy": CERTIFICATE,
        "history": [{"step": 1, "held_out_loss": float("nan")}],
        "config": {"lora": {"rank": 4, "alpha": None}, "model": {"path": None}},
    }
    (run / "report.json").write_text(json.dumps(report))
    return run


def test_the_whole_flow(tmp_path: Path, run_dir: Path) -> None:
    keys = tmp_path / "keys"
    out = ok(tgsp("keygen", "--out", keys, "--name", "acme"))
    assert "acme.sign.pub" in out and "fingerprint" in out
    assert stat.S_IMODE((keys / "acme.sign.key").stat().st_mode) == 0o600
    passphrase = {"CUSTOMER_PASS": "s3cret passphrase"}
    ok(tgsp("keygen", "--out", keys, "--name", "customer", "--passphrase-env", "CUSTOMER_PASS", env=passphrase))
    assert json.loads((keys / "customer.recipient.key").read_text())["encrypted"] is True

    package = tmp_path / "adapter.tgsp"
    out = ok(
        tgsp(
            "pack", run_dir, "--out", package, "--signing-key", keys / "acme.sign.key",
            "--recipient", keys / "customer.recipient.pub", "--not-after", "2999-12-31",
        )
    )  # fmt: skip
    assert f"wrote {package}" in out

    manifest = json.loads(ok(tgsp("inspect", package, "--json")))
    assert manifest["privacy_certificate"] == CERTIFICATE
    assert manifest["base_model"]["id"] == "tensafe-embedded-tiny-llama"
    assert manifest["lora"] == {"rank": 4, "alpha": None}
    assert manifest["policy"] == {"allowed_base_models": None, "not_after": "2999-12-31"}
    assert [f["path"] for f in manifest["files"]] == ["adapter_config.json", "adapter_model.safetensors"]

    text = ok(tgsp("inspect", package))
    assert text.startswith("UNVERIFIED")
    assert manifest["package_id"] in text and manifest["producer"]["fingerprint"] in text
    assert "epsilon 2.973 at delta 1e-05" in text and "adapter_model.safetensors" in text

    assert "OK:" in ok(tgsp("verify", package, "--trusted", keys / "acme.sign.pub"))

    destination = tmp_path / "unpacked"
    ok(
        tgsp(
            "unpack", package, "--recipient-key", keys / "customer.recipient.key", "--trusted", keys / "acme.sign.pub",
            "--out", destination, "--passphrase-env", "CUSTOMER_PASS", env=passphrase,
        )
    )  # fmt: skip
    assert {p.name: p.read_bytes() for p in destination.iterdir()} == adapter_files()

    # Failures: exit status 2, one line, no traceback.
    fails(tgsp("verify", package, "--trusted", keys / "customer.sign.pub"), "not trusted")
    fails(
        tgsp(
            "unpack", package, "--recipient-key", keys / "customer.recipient.key", "--trusted", keys / "acme.sign.pub",
            "--out", tmp_path / "again",
        ),
        "passphrase-protected",
    )  # fmt: skip
    fails(
        tgsp(
            "unpack", package, "--recipient-key", keys / "acme.recipient.key", "--trusted", keys / "acme.sign.pub",
            "--out", tmp_path / "again",
        ),
        "not encrypted to recipient key",
    )  # fmt: skip
    fails(tgsp("keygen", "--out", keys, "--name", "acme"), "refusing to overwrite")
    assert not (tmp_path / "again").exists()


def test_a_tampered_package_fails_with_exit_status_2(tmp_path: Path, run_dir: Path) -> None:
    keys = tmp_path / "keys"
    ok(tgsp("keygen", "--out", keys, "--name", "k"))
    package = tmp_path / "p.tgsp"
    ok(tgsp("pack", run_dir / "adapter", "--out", package, "--signing-key", keys / "k.sign.key",
            "--recipient", keys / "k.recipient.pub", "--base-model", "hf/base"))  # fmt: skip
    data = bytearray(package.read_bytes())
    data[-1] ^= 1
    package.write_bytes(bytes(data))
    fails(
        tgsp("unpack", package, "--recipient-key", keys / "k.recipient.key", "--trusted", keys / "k.sign.pub",
             "--out", tmp_path / "out"),
        "failed authentication",
    )  # fmt: skip
    assert not (tmp_path / "out").exists()
    package.write_bytes(b"\x89TGSP\r\n\x1a" + bytes(10))
    fails(tgsp("inspect", package), "ends inside")
    fails(tgsp("pack", run_dir / "adapter", "--out", tmp_path / "q.tgsp", "--signing-key", keys / "k.sign.key",
               "--recipient", keys / "k.recipient.pub"), "--base-model")  # fmt: skip


def test_verify_says_it_does_not_authenticate_the_payload(package: Path, producer: Party) -> None:
    out = ok(tgsp("verify", package, "--trusted", producer.sign_pub))
    assert out.startswith(f"OK: {package} is signed by trusted key {producer.signing.fingerprint}\nverified:\n")
    verified, rest = out.split("\nNOT verified:\n")
    not_verified = rest.split("\npackage ")[0]
    for checked in ("both signatures (Ed25519 and ML-DSA-65)", "--trusted keys", "every manifest field", "policy"):
        assert checked in verified
    assert "payload" not in verified
    assert not_verified.startswith("  - the payload (the encrypted adapter files): verify does not read it; ")
    assert "only `tensafe tgsp unpack`, with a recipient key, authenticates it" in not_verified
    assert "AES-GCM tag of every chunk" in not_verified

    shown = json.loads(ok(tgsp("verify", package, "--trusted", producer.sign_pub, "--json")))
    assert shown["package_id"] and len(shown["verification"]["verified"]) == 5
    assert shown["verification"]["not_verified"] == [not_verified.removeprefix("  - ")]

    help_text = " ".join(ok(tgsp("verify", "--help")).split())
    assert "the payload is NOT verified" in help_text
    verified_help, not_verified_help = help_text.split(" NOT verified: ")
    assert all(f"- {item}" in verified_help for item in VERIFIED)
    assert [f"- {item}" for item in NOT_VERIFIED] == [not_verified_help.split(" Options:")[0]]
