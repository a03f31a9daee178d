"""A FIFO, device or directory given as a package or key file is refused at once, never waited on.

Opening a FIFO for reading blocks until something writes to it, so each FIFO
case runs in a subprocess with a timeout: a regression fails here instead of
hanging the suite.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tensafe_tgsp import format as fmt
from tensafe_tgsp import keys
from tensafe_tgsp.errors import KeyFileError, MalformedPackage
from tests.tgsp.helpers import Party, adapter_files

#: Seconds a refusal may take; a blocked open would take forever.
TIMEOUT = 20
REFUSED = "is a FIFO (named pipe), not a regular file; refusing to read it"

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")


def run(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENSAFE_")}
    try:
        return subprocess.run(
            [sys.executable, *map(str, argv)],
            capture_output=True,
            text=True,
            env=env,
            stdin=subprocess.DEVNULL,
            timeout=TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(map(str, argv[2:]))} hung on a FIFO instead of refusing it")


def tgsp(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return run("-m", "tensafe.cli.main", "tgsp", *args)


def refused(result: subprocess.CompletedProcess[str], what: str, fifo: Path) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: {what} {fifo} {REFUSED}"), result.stderr


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("command", ["verify", "inspect", "unpack"])
def test_a_fifo_package_is_refused_at_once(
    command: str, fifo: Path, producer: Party, customer: Party, tmp_path: Path
) -> None:
    args: dict[str, list[str | Path]] = {
        "verify": ["--trusted", producer.sign_pub],
        "inspect": [],
        "unpack": [
            "--recipient-key", customer.recipient_key, "--trusted", producer.sign_pub, "--out", tmp_path / "out",
        ],
    }  # fmt: skip
    refused(tgsp(command, fifo, *args[command]), "package", fifo)
    assert not (tmp_path / "out").exists()


def test_fifo_key_files_are_refused_at_once(
    fifo: Path, package: Path, producer: Party, customer: Party, tmp_path: Path
) -> None:
    refused(tgsp("verify", package, "--trusted", fifo), "key file", fifo)
    result = tgsp(
        "unpack", package, "--recipient-key", fifo, "--trusted", producer.sign_pub, "--out", tmp_path / "out"
    )  # fmt: skip
    refused(result, "key file", fifo)
    source = tmp_path / "adapter"
    source.mkdir()
    for name, data in adapter_files(floats=16).items():
        (source / name).write_bytes(data)
    pack = ["pack", source, "--out", tmp_path / "p.tgsp", "--base-model", "m", "--recipient", customer.recipient_pub]
    refused(tgsp(*pack, "--signing-key", fifo), "key file", fifo)
    refused(tgsp(*pack, "--signing-key", producer.sign_key, "--certificate", fifo), "certificate", fifo)
    assert not (tmp_path / "p.tgsp").exists()


def test_the_loader_refuses_a_fifo_at_once(fifo: Path, producer: Party, customer: Party, tmp_path: Path) -> None:
    code = """
import sys
from pathlib import Path
from tensafe_tgsp.errors import MalformedPackage
from tensafe_tgsp.loader import TGSPPackageLoader

fifo, recipient, signer, out = map(Path, sys.argv[1:])
for untrusted in (False, True):
    try:
        TGSPPackageLoader().load(
            fifo, recipient_key=recipient, trusted_signers=[signer], destination=out,
            allow_untrusted_signer=untrusted,
        )
    except MalformedPackage as exc:
        print(exc)
"""
    result = run("-c", code, fifo, customer.recipient_key, producer.sign_pub, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"package {fifo} {REFUSED}"] * 2
    assert not (tmp_path / "out").exists()


def test_directories_and_devices_are_refused(tmp_path: Path, producer: Party) -> None:
    with pytest.raises(MalformedPackage, match="is a directory, not a regular file"):
        fmt.inspect(tmp_path)
    with pytest.raises(KeyFileError, match="is a directory, not a regular file"):
        keys.load_signing_public_key(tmp_path)
    if Path("/dev/null").exists():
        with pytest.raises(MalformedPackage, match="is a character device, not a regular file"):
            fmt.verify("/dev/null", [producer.sign_pub])
