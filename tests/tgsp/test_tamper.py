"""Every kind of tampering is detected with a specific TGSPError, and unpack never leaves files behind."""

from __future__ import annotations

import struct
import time
import tracemalloc
from pathlib import Path

import pytest

from tensafe_tgsp import format as fmt
from tensafe_tgsp.errors import (
    IntegrityError,
    MalformedPackage,
    SignatureInvalid,
    TGSPError,
    TrailingData,
    TruncatedPackage,
    UnsafePath,
    UnsupportedVersion,
)
from tests.tgsp.helpers import Party, chunk_spans, craft_package, listing, regions


def attempt_unpack(path: Path, customer: Party, producer: Party) -> TGSPError:
    """Unpack ``path``, expecting failure; check that nothing at all was written next to the package."""
    before = listing(path.parent)
    with pytest.raises(TGSPError) as info:
        fmt.unpack(
            path, recipient_key=customer.recipient, trusted_signers=[producer.sign_pub], destination=path.parent / "out"
        )
    assert listing(path.parent) == before, "unpack left files behind"
    return info.value


def flip(data: bytes, offset: int, bit: int = 0) -> bytes:
    changed = bytearray(data)
    changed[offset] ^= 1 << bit
    return bytes(changed)


# Region -> (offsets within the region to flip, expected error class, whether verify alone detects it).
HEADER_CASES = {
    "magic": ([0, 3, 7], MalformedPackage),
    "version": ([8, 9], UnsupportedVersion),
    "flags": ([10, 11], MalformedPackage),
    "manifest_len": ([12, 14, 15], MalformedPackage),
    "signature_len": ([16, 19], MalformedPackage),
    "recipients_len": ([20, 23], MalformedPackage),
    "payload_len": ([24, 28, 31], MalformedPackage),
}
SIGNED_REGIONS = ["manifest", "signature", "recipients"]


@pytest.mark.parametrize("field", sorted(HEADER_CASES))
def test_bit_flips_in_the_header(field: str, package: Path, producer: Party, customer: Party) -> None:
    offsets, expected = HEADER_CASES[field]
    original = package.read_bytes()
    for offset in offsets:
        for bit in (0, 7):
            package.write_bytes(flip(original, offset, bit))
            with pytest.raises(expected):
                fmt.verify(package, [producer.sign_pub])
            assert isinstance(attempt_unpack(package, customer, producer), expected)


@pytest.mark.parametrize("region", SIGNED_REGIONS)
def test_bit_flips_in_signed_regions_break_the_signature(
    region: str, package: Path, producer: Party, customer: Party
) -> None:
    original = package.read_bytes()
    start, end = regions(original)[region]
    for offset in sorted({start, start + 1, start + 33, (start + end) // 2, end - 1}):
        package.write_bytes(flip(original, offset, offset % 8))
        with pytest.raises(SignatureInvalid):
            fmt.verify(package, [producer.sign_pub])
        assert isinstance(attempt_unpack(package, customer, producer), SignatureInvalid)


def test_bit_flips_in_each_payload_chunk_and_the_final_tag(package: Path, producer: Party, customer: Party) -> None:
    original = package.read_bytes()
    spans = chunk_spans(original)
    assert len(spans) == 3
    offsets = [o for start, end in spans for o in (start, (start + end) // 2, end - 17, end - 16, end - 1)]
    assert offsets[-1] == len(original) - 1  # the final chunk's tag
    for offset in offsets:
        package.write_bytes(flip(original, offset, 3))
        fmt.verify(package, [producer.sign_pub])  # the payload is authenticated while it is decrypted
        error = attempt_unpack(package, customer, producer)
        assert type(error) is IntegrityError, error


def test_truncation_at_every_region_boundary(package: Path, producer: Party, customer: Party) -> None:
    original = package.read_bytes()
    spans = regions(original)
    cuts = {0, 1, 4, 8, 12, 31, len(original) - 1, len(original) - 16}
    for start, end in spans.values():
        cuts.update({start, end - 1})
    cuts.discard(len(original))
    for cut in sorted(cuts):
        package.write_bytes(original[:cut])
        with pytest.raises(TruncatedPackage):
            fmt.verify(package, [producer.sign_pub])
        assert isinstance(attempt_unpack(package, customer, producer), TruncatedPackage)
    package.write_bytes(original + b"\x00")
    with pytest.raises(TrailingData):
        fmt.inspect(package)


def test_not_a_package_at_all(tmp_path: Path, producer: Party) -> None:
    for content in (b"PK\x03\x04 a zip file", b"{}", b"\x89TGSQ", bytes(100)):
        path = tmp_path / "x.tgsp"
        path.write_bytes(content)
        with pytest.raises(MalformedPackage) as info:
            fmt.verify(path, [producer.sign_pub])
        assert type(info.value) is MalformedPackage


def test_reordered_chunks(package: Path, producer: Party, customer: Party) -> None:
    data = package.read_bytes()
    (a0, a1), (b0, b1), _ = chunk_spans(data)
    package.write_bytes(data[:a0] + data[b0:b1] + data[a0:a1] + data[b1:])
    assert type(attempt_unpack(package, customer, producer)) is IntegrityError


def test_duplicated_chunks(package: Path, producer: Party, customer: Party) -> None:
    data = package.read_bytes()
    (a0, a1), (b0, b1), _ = chunk_spans(data)
    package.write_bytes(data[:b0] + data[a0:a1] + data[b1:])  # chunk 0 in chunk 1's place
    assert type(attempt_unpack(package, customer, producer)) is IntegrityError
    package.write_bytes(data[:b0] + data[a0:a1] + data[b0:])  # chunk 0 inserted a second time
    error = attempt_unpack(package, customer, producer)
    assert isinstance(error, IntegrityError) and isinstance(error, TrailingData)


def test_dropped_chunks(package: Path, producer: Party, customer: Party) -> None:
    data = package.read_bytes()
    (a0, _), (b0, b1), (c0, c1) = chunk_spans(data)
    for cut in (data[:b0] + data[b1:], data[:c0], data[:a0] + data[b0:]):
        package.write_bytes(cut)
        error = attempt_unpack(package, customer, producer)
        assert isinstance(error, IntegrityError) and isinstance(error, TruncatedPackage)
    # Drop chunk 0 and repeat chunk 1 so that the length is right: the chunks are in the wrong places.
    package.write_bytes(data[:a0] + data[b0:b1] + data[b0:b1] + data[c0:c1])
    assert type(attempt_unpack(package, customer, producer)) is IntegrityError


def two_packages(tmp_path: Path, producer: Party, customer: Party, files: dict[str, bytes]) -> tuple[bytes, bytes]:
    for name in ("a", "b"):
        fmt.pack(
            files,
            tmp_path / f"{name}.tgsp",
            signing_key=producer.signing,
            recipients=[customer.recipient_pub],
            base_model="tiny-base",
        )
    return (tmp_path / "a.tgsp").read_bytes(), (tmp_path / "b.tgsp").read_bytes()


def test_spliced_manifest_from_another_valid_package(
    tmp_path: Path, producer: Party, customer: Party, files: dict[str, bytes]
) -> None:
    a, b = two_packages(tmp_path, producer, customer, files)
    ra, rb = regions(a), regions(b)
    assert ra["manifest"] == rb["manifest"]
    start, end = ra["manifest"]
    target = tmp_path / "work" / "spliced.tgsp"
    target.parent.mkdir()
    target.write_bytes(a[:start] + b[start:end] + a[end:])
    with pytest.raises(SignatureInvalid):
        fmt.verify(target, [producer.sign_pub])
    assert isinstance(attempt_unpack(target, customer, producer), SignatureInvalid)
    # Everything signed from b, the payload from a: the signature holds, the payload does not.
    payload = ra["payload"][0]
    target.write_bytes(b[:payload] + a[payload:])
    fmt.verify(target, [producer.sign_pub])
    assert type(attempt_unpack(target, customer, producer)) is IntegrityError
    # One chunk of b spliced into a at the same index.
    (c0, c1) = chunk_spans(a)[1]
    target.write_bytes(a[:c0] + b[c0:c1] + a[c1:])
    assert type(attempt_unpack(target, customer, producer)) is IntegrityError
    # a's recipient block in b: its signature no longer covers what is there.
    r0, r1 = ra["recipients"]
    target.write_bytes(b[:r0] + a[r0:r1] + b[r1:])
    assert isinstance(attempt_unpack(target, customer, producer), SignatureInvalid)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("manifest_len", 0xFFFFFFFF),
        ("manifest_len", (1 << 20) + 1),
        ("recipients_len", 0xFFFFFFF0),
        ("payload_len", 0xFFFFFFFFFFFFFFFF),
        ("payload_len", 5 << 30),
        ("signature_len", 0x7FFFFFFF),
    ],
)
def test_absurd_length_fields_fail_fast_without_allocating(
    field: str, value: int, package: Path, producer: Party, customer: Party
) -> None:
    data = bytearray(package.read_bytes())
    start, end = regions(bytes(data))[field]
    data[start:end] = value.to_bytes(end - start, "big")
    package.write_bytes(bytes(data))
    tracemalloc.start()
    began = time.perf_counter()
    try:
        with pytest.raises(MalformedPackage):
            fmt.verify(package, [producer.sign_pub])
        with pytest.raises(MalformedPackage):
            fmt.inspect(package)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - began < 2
    assert peak < 10 << 20, peak
    assert isinstance(attempt_unpack(package, customer, producer), MalformedPackage)


def test_a_header_alone_claiming_gigabytes(tmp_path: Path, producer: Party) -> None:
    path = tmp_path / "x.tgsp"
    path.write_bytes(fmt.HEADER.pack(fmt.MAGIC, 1, 0, 1 << 20, fmt.SIGNATURE_BLOCK_LEN, 2 + 1212 * 1024, 1 << 40))
    tracemalloc.start()
    try:
        with pytest.raises(TruncatedPackage):
            fmt.verify(path, [producer.sign_pub])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 10 << 20


# -- unsafe archives (crafted by someone who knows the content key) --------------------------------------------


def test_traversal_in_the_signed_index_is_refused_before_decrypting(
    tmp_path: Path, producer: Party, customer: Party
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    for bad in (b"../evil", b"/tmp/evil", b"a/../../evil"):
        path = work / "p.tgsp"
        path.unlink(missing_ok=True)
        craft_package(path, producer=producer, recipients=[customer.recipient.public_key()], entries=[(1, bad, b"x")])
        with pytest.raises(UnsafePath):
            fmt.verify(path, [producer.sign_pub])
        assert isinstance(attempt_unpack(path, customer, producer), UnsafePath)
    assert listing(tmp_path) == ["work", "work/p.tgsp"]


@pytest.mark.parametrize(
    ("entries", "index"),
    [
        pytest.param([(1, b"../evil", b"pwned")], ["ab/evil"], id="dotdot"),
        pytest.param([(1, b"ok", b"1"), (1, b"../../evil", b"pwned")], ["ok", "zz/yy/evil"], id="dotdot-second"),
        pytest.param([(1, b"/tmp/tgsp-evil", b"pwned")], ["tmp/tgsp-evill"], id="absolute"),
        pytest.param([(2, b"link", b"/etc/passwd")], ["link"], id="symlink"),
        pytest.param([(3, b"dev0", b"")], ["dev0"], id="device"),
        pytest.param([(5, b"dir/", b"")], ["dirx"], id="directory"),
        pytest.param([(1, b"same", b"1"), (1, b"same", b"2")], ["same", "samf"], id="duplicate"),
        pytest.param([(1, b"Same", b"1"), (1, b"same", b"2")], ["Same", "samf"], id="case-duplicate"),
        pytest.param([(1, b"a", b"1"), (1, b"a/b", b"2")], ["a", "b/b"], id="file-and-directory"),
        pytest.param([(1, b"bad\xff", b"1")], ["badx"], id="not-utf8"),
        pytest.param([(1, b"a\\..\\evil", b"1")], ["a_.._evil"], id="backslash"),
    ],
)
def test_unsafe_archive_entries_are_refused_and_nothing_is_written(
    entries: list[tuple[int, bytes, bytes]], index: list[str], tmp_path: Path, producer: Party, customer: Party
) -> None:
    work = tmp_path / "deep" / "work"
    work.mkdir(parents=True)
    path = work / "p.tgsp"
    craft_package(
        path, producer=producer, recipients=[customer.recipient.public_key()], entries=entries, index_paths=index
    )
    fmt.verify(path, [producer.sign_pub])  # the signed index is fine; the archive is not
    assert isinstance(attempt_unpack(path, customer, producer), UnsafePath)
    assert listing(tmp_path) == ["deep", "deep/work", "deep/work/p.tgsp"]
    assert not Path("/tmp/tgsp-evil").exists()


def test_archive_that_differs_from_the_signed_index(tmp_path: Path, producer: Party, customer: Party) -> None:
    cases = [
        ([(1, b"a", b"1"), (1, b"b", b"2")], ["b", "c"]),  # other names
        ([(1, b"b", b"1"), (1, b"a", b"2")], ["a", "b"]),  # other order
    ]
    for entries, index in cases:
        path = tmp_path / "p.tgsp"
        path.unlink(missing_ok=True)
        craft_package(
            path, producer=producer, recipients=[customer.recipient.public_key()], entries=entries, index_paths=index
        )
        assert type(attempt_unpack(path, customer, producer)) is IntegrityError


def test_archive_with_a_wrong_hash_or_extra_bytes(tmp_path: Path, producer: Party, customer: Party) -> None:
    recipients = [customer.recipient.public_key()]
    path = tmp_path / "p.tgsp"
    craft_package(path, producer=producer, recipients=recipients, entries=[(1, b"a", b"1")])
    manifest = fmt.inspect(path)
    manifest["files"][0]["sha256"] = "0" * 64
    path.unlink()
    archive = struct.pack(">BH", 1, 1) + b"a" + struct.pack(">Q", 1) + b"1" + b"\x00"
    fmt.write_package(path, manifest=manifest, plaintext=[archive], signing_key=producer.signing, recipients=recipients)
    error = attempt_unpack(path, customer, producer)
    assert type(error) is IntegrityError and "SHA-256" in str(error)
