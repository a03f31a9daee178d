"""Staging directories: a killed unpack's leftover is removed by the next unpack, a live one never is."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tensafe_tgsp import format as fmt
from tensafe_tgsp.format import staging, unpacking
from tests.tgsp.helpers import Party

fcntl = pytest.importorskip("fcntl")

HOUR_AGO = time.time() - 3600


def staging_dir(parent: Path, name: str, *, mtime: float | None = None) -> Path:
    """A staging directory as a killed unpack leaves it: decrypted files inside."""
    path = parent / name
    (path / "sub").mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(b"decrypted weights")
    (path / "sub" / "more").write_bytes(b"more")
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


@pytest.fixture
def locked(tmp_path: Path) -> Iterator[Path]:
    """An old staging directory whose unpack is still alive: this process holds its lock."""
    path = staging_dir(tmp_path / "parent", ".tgsp-unpack-live0001", mtime=HOUR_AGO)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield path
    os.close(fd)


def test_the_next_unpack_removes_only_a_dead_unpacks_staging_directory(
    package: Path, producer: Party, customer: Party, tmp_path: Path, locked: Path
) -> None:
    parent = locked.parent
    stale = staging_dir(parent, ".tgsp-unpack-k1ll3d_x", mtime=HOUR_AGO)
    fresh = staging_dir(parent, ".tgsp-unpack-running1")  # just created: maybe not locked yet
    others = [
        staging_dir(parent, ".tgsp-unpack-toolong123", mtime=HOUR_AGO),  # not a staging name
        staging_dir(parent, "tgsp-unpack-abcd1234", mtime=HOUR_AGO),
        staging_dir(parent, ".tgsp-unpack-UPPER123", mtime=HOUR_AGO),
    ]
    elsewhere = staging_dir(tmp_path, "elsewhere", mtime=HOUR_AGO)
    link = parent / ".tgsp-unpack-link0001"
    link.symlink_to(elsewhere, target_is_directory=True)
    os.utime(link, (HOUR_AGO, HOUR_AGO), follow_symlinks=False)

    result = subprocess.run(
        [
            sys.executable, "-m", "tensafe.cli.main", "tgsp", "unpack", str(package),
            "--recipient-key", str(customer.recipient_key), "--trusted", str(producer.sign_pub),
            "--out", str(parent / "adapter"),
        ],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"removed {stale}: an interrupted unpack left it behind" in result.stderr
    assert not stale.exists()
    assert sorted(p.name for p in parent.iterdir()) == sorted(
        ["adapter", *(p.name for p in (locked, fresh, link, *others))]
    )
    for directory in (locked, fresh, elsewhere, *others):
        assert (directory / "adapter_model.safetensors").read_bytes() == b"decrypted weights"
    assert link.is_symlink()


def test_a_staging_directory_of_another_user_is_left_alone(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("making a directory owned by another user needs root")
    theirs = staging_dir(tmp_path, ".tgsp-unpack-theirs01")
    os.chown(theirs, 12345, -1)
    os.utime(theirs, (HOUR_AGO, HOUR_AGO))
    mine = staging_dir(tmp_path, ".tgsp-unpack-mine0001", mtime=HOUR_AGO)
    assert staging.remove_stale_staging(tmp_path) == [mine]
    assert theirs.exists() and not mine.exists()


def test_a_staging_directory_is_old_enough_only_after_the_grace_period(tmp_path: Path) -> None:
    almost = time.time() - staging.STALE_AFTER_SECONDS + 60
    young = staging_dir(tmp_path, ".tgsp-unpack-young001", mtime=almost)
    assert staging.remove_stale_staging(tmp_path) == []
    assert young.exists()
    os.utime(young, (almost - 120, almost - 120))
    assert staging.remove_stale_staging(tmp_path) == [young]


def test_a_live_unpack_holds_the_lock_on_its_staging_directory(
    package: Path, producer: Party, customer: Party, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    held: list[bool] = []
    extract = unpacking.extract_payload

    def checking(handle, layout, manifest, content_key, directory: Path):  # type: ignore[no-untyped-def]
        os.utime(directory, (HOUR_AGO, HOUR_AGO))  # as old as a stale one: only the lock protects it
        assert staging.remove_stale_staging(directory.parent) == []
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held.append(True)
        finally:
            os.close(fd)
        return extract(handle, layout, manifest, content_key, directory)

    monkeypatch.setattr(unpacking, "extract_payload", checking)
    fmt.unpack(
        package,
        recipient_key=customer.recipient_key,
        trusted_signers=[producer.sign_pub],
        destination=tmp_path / "out",
    )
    assert held == [True]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.tgsp", "out"]
