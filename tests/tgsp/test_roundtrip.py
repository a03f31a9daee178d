"""pack → inspect → verify → unpack, recipients, trust, policy and streaming."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import stat
import tracemalloc
from pathlib import Path

import pytest

from tensafe.errors import TensafeError
from tensafe_tgsp import format as fmt
from tensafe_tgsp.errors import (
    DestinationExists,
    NotARecipient,
    PackError,
    PolicyViolation,
    TGSPError,
    UnsafePath,
    UntrustedSigner,
)
from tests.tgsp.helpers import CERTIFICATE, Party, listing, safetensors_header


def unpack(package: Path, party: Party, trusted: Party, destination: Path, **kwargs: object) -> dict[str, object]:
    return fmt.unpack(
        package,
        recipient_key=party.recipient_key,
        trusted_signers=[trusted.sign_pub],
        destination=destination,
        **kwargs,
    )


def read_tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def test_round_trip_gives_identical_bytes(
    package: Path, producer: Party, customer: Party, files: dict[str, bytes], tmp_path: Path
) -> None:
    verified = fmt.verify(package, [producer.sign_pub])
    manifest = unpack(package, customer, producer, tmp_path / "out")
    assert manifest == verified == fmt.inspect(package)
    assert read_tree(tmp_path / "out") == files
    header = safetensors_header((tmp_path / "out" / "adapter_model.safetensors").read_bytes())
    assert header["lora_A.weight"]["shape"] == [40_000]
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "out" / "adapter_config.json").stat().st_mode) == 0o600


def test_manifest_records_everything_it_should(
    package: Path, producer: Party, customer: Party, files: dict[str, bytes]
) -> None:
    manifest = fmt.inspect(package)
    assert manifest["format"] == "TGSP" and manifest["format_version"] == 1
    assert manifest["producer"] == {"fingerprint": producer.signing.fingerprint}
    assert manifest["recipients"] == [customer.recipient.fingerprint]
    assert manifest["base_model"] == {"id": "tiny-base", "sha256": None, "revision": None}
    assert manifest["lora"] == {"rank": 8}
    assert manifest["privacy_certificate"] == CERTIFICATE
    assert manifest["files"] == [
        {"path": p, "size": len(files[p]), "sha256": hashlib.sha256(files[p]).hexdigest()} for p in sorted(files)
    ]
    assert manifest["payload"]["chunks"] == 3
    assert dt.datetime.strptime(manifest["created"], "%Y-%m-%dT%H:%M:%SZ")


def test_a_directory_with_subdirectories_round_trips(producer: Party, customer: Party, tmp_path: Path) -> None:
    source = tmp_path / "adapter"
    (source / "nested" / "deeper").mkdir(parents=True)
    contents = {"a.json": b"{}", "nested/b.bin": os.urandom(70_000), "nested/deeper/c": b"", "z": b"z" * 65_536}
    for name, data in contents.items():
        (source / name).write_bytes(data)
    fmt.pack(
        source, tmp_path / "p.tgsp", signing_key=producer.sign_key, recipients=[customer.recipient_pub], base_model="m"
    )
    unpack(tmp_path / "p.tgsp", customer, producer, tmp_path / "out")
    assert read_tree(tmp_path / "out") == contents


def test_an_empty_package_round_trips(producer: Party, customer: Party, tmp_path: Path) -> None:
    fmt.pack({}, tmp_path / "p.tgsp", signing_key=producer.signing, recipients=[customer.recipient_pub], base_model="m")
    assert unpack(tmp_path / "p.tgsp", customer, producer, tmp_path / "out")["files"] == []
    assert listing(tmp_path / "out") == []


def test_two_recipients_each_decrypt(
    producer: Party, customer: Party, stranger: Party, files: dict[str, bytes], tmp_path: Path
) -> None:
    path = tmp_path / "p.tgsp"
    fmt.pack(
        files,
        path,
        signing_key=producer.signing,
        recipients=[customer.recipient_pub, stranger.recipient_pub],
        base_model="m",
    )
    for party in (customer, stranger):
        unpack(path, party, producer, tmp_path / party.name)
        assert read_tree(tmp_path / party.name) == files


def test_the_wrong_recipient_key_is_not_a_recipient(package: Path, producer: Party, tmp_path: Path) -> None:
    with pytest.raises(NotARecipient):
        unpack(package, producer, producer, tmp_path / "out")
    assert listing(tmp_path) == ["adapter.tgsp"]


def test_a_valid_signature_by_an_untrusted_key_is_refused(
    package: Path, customer: Party, stranger: Party, tmp_path: Path
) -> None:
    with pytest.raises(UntrustedSigner, match="validly signed"):
        fmt.verify(package, [stranger.sign_pub])
    with pytest.raises(UntrustedSigner):
        unpack(package, customer, stranger, tmp_path / "out")
    with pytest.raises(UntrustedSigner, match="no trusted signer"):
        fmt.verify(package, [])
    assert listing(tmp_path) == ["adapter.tgsp"]


def test_any_trusted_key_in_the_list_suffices(package: Path, producer: Party, stranger: Party) -> None:
    fmt.verify(package, [stranger.sign_pub, producer.signing.public_key()])


def test_expired_not_after_is_a_policy_violation(
    producer: Party, customer: Party, files: dict[str, bytes], tmp_path: Path
) -> None:
    path = tmp_path / "p.tgsp"
    fmt.pack(
        files,
        path,
        signing_key=producer.signing,
        recipients=[customer.recipient_pub],
        base_model="m",
        not_after="2000-01-01",
    )
    with pytest.raises(PolicyViolation, match="expired"):
        fmt.verify(path, [producer.sign_pub])
    with pytest.raises(PolicyViolation):
        unpack(path, customer, producer, tmp_path / "out")
    assert listing(tmp_path) == ["p.tgsp"]


def test_not_after_is_valid_through_the_end_of_its_day(producer: Party, customer: Party, tmp_path: Path) -> None:
    path = tmp_path / "p.tgsp"
    fmt.pack(
        {"a": b"1"},
        path,
        signing_key=producer.signing,
        recipients=[customer.recipient_pub],
        base_model="m",
        not_after="2031-03-04",
    )
    assert fmt.inspect(path)["policy"] == {"allowed_base_models": None, "not_after": "2031-03-04"}
    fmt.verify(path, [producer.sign_pub], now=dt.datetime(2031, 3, 4, 23, 59, 59, tzinfo=dt.UTC))
    with pytest.raises(PolicyViolation):
        fmt.verify(path, [producer.sign_pub], now=dt.datetime(2031, 3, 5, tzinfo=dt.UTC))


def test_not_after_with_a_time_zone_is_stored_in_utc(producer: Party, customer: Party, tmp_path: Path) -> None:
    path = tmp_path / "p.tgsp"
    fmt.pack(
        {"a": b"1"},
        path,
        signing_key=producer.signing,
        recipients=[customer.recipient_pub],
        base_model="m",
        not_after="2031-03-04T10:00:00+02:00",
    )
    assert fmt.inspect(path)["policy"]["not_after"] == "2031-03-04T08:00:00Z"
    with pytest.raises(PackError, match="time zone"):
        fmt.pack(
            {"a": b"1"},
            tmp_path / "q.tgsp",
            signing_key=producer.signing,
            recipients=[customer.recipient_pub],
            base_model="m",
            not_after="2031-03-04T10:00:00",
        )


def test_disallowed_base_model_is_a_policy_violation(producer: Party, customer: Party, tmp_path: Path) -> None:
    path = tmp_path / "p.tgsp"
    fmt.pack(
        {"a": b"1"},
        path,
        signing_key=producer.signing,
        recipients=[customer.recipient_pub],
        base_model="base-a",
        allowed_base_models=["base-a", "base-a-instruct"],
    )
    fmt.verify(path, [producer.sign_pub], base_model="base-a-instruct")
    with pytest.raises(PolicyViolation, match="not allowed"):
        fmt.verify(path, [producer.sign_pub], base_model="base-b")
    with pytest.raises(PolicyViolation):
        unpack(path, customer, producer, tmp_path / "out", base_model="base-b")
    assert not (tmp_path / "out").exists()


def test_a_package_whose_own_base_model_is_not_allowed_is_refused(
    producer: Party, customer: Party, tmp_path: Path
) -> None:
    path = tmp_path / "p.tgsp"
    fmt.pack(
        {"a": b"1"},
        path,
        signing_key=producer.signing,
        recipients=[customer.recipient_pub],
        base_model="base-a",
        allowed_base_models=["base-b"],
    )
    with pytest.raises(PolicyViolation, match="allowed_base_models"):
        fmt.verify(path, [producer.sign_pub])


def test_without_an_allow_list_the_base_model_must_match(package: Path, producer: Party) -> None:
    fmt.verify(package, [producer.sign_pub], base_model="tiny-base")
    with pytest.raises(PolicyViolation):
        fmt.verify(package, [producer.sign_pub], base_model="another-base")


def test_destination_must_be_new_or_empty(package: Path, producer: Party, customer: Party, tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("keep")
    with pytest.raises(DestinationExists):
        unpack(package, customer, producer, tmp_path / "full")
    assert listing(tmp_path / "full") == ["keep.txt"]
    (tmp_path / "empty").mkdir()
    unpack(package, customer, producer, tmp_path / "empty")
    assert len(listing(tmp_path / "empty")) == 2


def test_missing_parent_directories_are_created(
    package: Path, producer: Party, customer: Party, tmp_path: Path
) -> None:
    unpack(package, customer, producer, tmp_path / "a" / "b" / "out")
    assert len(listing(tmp_path / "a" / "b" / "out")) == 2


def test_pack_never_overwrites_and_never_leaves_a_partial_file(
    producer: Party, customer: Party, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out" / "p.tgsp"
    out.parent.mkdir()
    out.write_bytes(b"precious")
    with pytest.raises(DestinationExists):
        fmt.pack({"a": b"1"}, out, signing_key=producer.signing, recipients=[customer.recipient_pub], base_model="m")
    assert out.read_bytes() == b"precious"

    source = tmp_path / "src"
    source.mkdir()
    (source / "weights.bin").write_bytes(os.urandom(200_000))
    original = fmt._Source.pieces

    def changing(self: fmt._Source):  # the file changes between indexing and encryption
        for piece in original(self):
            yield bytes(len(piece)) if self.sha256 else piece

    monkeypatch.setattr(fmt._Source, "pieces", changing)
    with pytest.raises(PackError, match="changed while"):
        fmt.pack(
            source,
            tmp_path / "out" / "q.tgsp",
            signing_key=producer.signing,
            recipients=[customer.recipient_pub],
            base_model="m",
        )
    assert listing(tmp_path / "out") == ["p.tgsp"]


def test_pack_refuses_unsafe_names_links_and_collisions(producer: Party, customer: Party, tmp_path: Path) -> None:
    def pack(source: object) -> None:
        fmt.pack(
            source,
            tmp_path / "p.tgsp",
            signing_key=producer.signing,
            recipients=[customer.recipient_pub],
            base_model="m",
        )  # type: ignore[arg-type]

    for name in ("../evil", "/etc/passwd", "a//b", "a/./b", "a\\b", "C:x", "", "a/", "x\x00y", "é" * 200):
        with pytest.raises(UnsafePath):
            pack({name: b"x"})
    for names in (("A.txt", "a.txt"), ("a", "a/b")):
        with pytest.raises(UnsafePath):
            pack(dict.fromkeys(names, b"x"))
    source = tmp_path / "src"
    source.mkdir()
    (source / "real").write_bytes(b"x")
    (source / "link").symlink_to(source / "real")
    with pytest.raises(PackError, match="symbolic link"):
        pack(source)
    assert not (tmp_path / "p.tgsp").exists()


def test_pack_checks_its_inputs(producer: Party, customer: Party, tmp_path: Path) -> None:
    def pack(**kwargs: object) -> None:
        args: dict[str, object] = {
            "signing_key": producer.signing,
            "recipients": [customer.recipient_pub],
            "base_model": "m",
        }
        args.update(kwargs)
        fmt.pack({"a": b"1"}, tmp_path / "p.tgsp", **args)  # type: ignore[arg-type]

    for certificate in (
        {"epsilon": 1.0},
        {"accountant": "rdp", "epsilon": -1, "delta": 1e-5, "steps": 1},
        {"accountant": "rdp", "epsilon": float("nan"), "delta": 1e-5, "steps": 1},
        {"accountant": "rdp", "epsilon": 1, "delta": 1e-5, "steps": True},
    ):
        with pytest.raises(PackError):
            pack(privacy_certificate=certificate)
    with pytest.raises(PackError):
        pack(recipients=[])
    with pytest.raises(PackError):
        pack(recipients=[customer.recipient_pub, customer.recipient.public_key()])
    with pytest.raises(PackError):
        pack(base_model_sha256="not-hex")
    with pytest.raises(PackError):
        pack(not_after="next tuesday")
    with pytest.raises(PackError):
        pack(lora_config={"x": object()})
    assert not (tmp_path / "p.tgsp").exists()


def test_every_error_is_a_tgsp_error_with_exit_code_2(tmp_path: Path, producer: Party) -> None:
    with pytest.raises(TGSPError) as info:
        fmt.inspect(tmp_path / "missing.tgsp")
    assert isinstance(info.value, TensafeError) and info.value.exit_code == 2
    with pytest.raises(TGSPError):
        fmt.inspect(tmp_path)
    with pytest.raises(TGSPError):
        fmt.verify(tmp_path / "missing.tgsp", [tmp_path / "missing.pub"])


def test_pack_and_unpack_stream_in_bounded_memory(producer: Party, customer: Party, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    block = os.urandom(1 << 20)
    with (source / "weights.bin").open("wb") as handle:
        for _ in range(32):
            handle.write(block)
    tracemalloc.start()
    try:
        fmt.pack(
            source,
            tmp_path / "big.tgsp",
            signing_key=producer.signing,
            recipients=[customer.recipient_pub],
            base_model="m",
        )
        _, pack_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        unpack(tmp_path / "big.tgsp", customer, producer, tmp_path / "out")
        _, unpack_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert pack_peak < 4 << 20 and unpack_peak < 4 << 20, (pack_peak, unpack_peak)
    assert (tmp_path / "out" / "weights.bin").stat().st_size == 32 << 20
    with (tmp_path / "out" / "weights.bin").open("rb") as handle:
        assert handle.read(1 << 20) == block
