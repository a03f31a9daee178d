"""Random mutations of a valid package: verify and unpack either succeed on unchanged bytes or raise a TGSPError."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tensafe_tgsp import format as fmt
from tensafe_tgsp.errors import TGSPError
from tests.tgsp.helpers import Party, adapter_files, listing


@pytest.fixture(scope="module")
def small_package(
    tmp_path_factory: pytest.TempPathFactory, producer: Party, customer: Party
) -> tuple[bytes, dict[str, bytes]]:
    """A two-chunk package (small, so that mutations often land in the header and signed regions)."""
    files = adapter_files(floats=20_000, seed=7)
    path = tmp_path_factory.mktemp("fuzz") / "p.tgsp"
    fmt.pack(files, path, signing_key=producer.signing, recipients=[customer.recipient_pub], base_model="m")
    return path.read_bytes(), files


def _mutation(size: int) -> st.SearchStrategy[tuple[str, int, int, bytes]]:
    position = st.integers(min_value=0, max_value=size)
    return st.one_of(
        st.tuples(st.just("flip"), position, st.integers(0, 7), st.just(b"")),
        st.tuples(st.just("truncate"), position, st.just(0), st.just(b"")),
        st.tuples(st.just("insert"), position, st.just(0), st.binary(min_size=1, max_size=64)),
        st.tuples(st.just("overwrite"), position, st.just(0), st.binary(min_size=1, max_size=64)),
        st.tuples(st.just("delete"), position, st.integers(1, 70_000), st.just(b"")),
    )


def _apply(data: bytes, mutations: list[tuple[str, int, int, bytes]]) -> bytes:
    out = bytearray(data)
    for kind, position, amount, payload in mutations:
        position = min(position, len(out))
        if kind == "flip" and position < len(out):
            out[position] ^= 1 << amount
        elif kind == "truncate":
            del out[position:]
        elif kind == "insert":
            out[position:position] = payload
        elif kind == "overwrite":
            out[position : position + len(payload)] = payload
        elif kind == "delete":
            del out[position : position + amount]
    return bytes(out)


# Most mutations hit the payload; positions are drawn over the whole file, and a
# second draw biased to the first 8 KiB covers the header and signed regions densely.
@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_packages_fail_only_with_tgsp_errors(
    data: st.DataObject, small_package: tuple[bytes, dict[str, bytes]], producer: Party, customer: Party
) -> None:
    original, files = small_package
    limit = data.draw(st.sampled_from([len(original), 8192]))
    mutations = data.draw(st.lists(_mutation(limit), min_size=1, max_size=3))
    mutated = _apply(original, mutations)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        path = root / "p.tgsp"
        path.write_bytes(mutated)
        with contextlib.suppress(TGSPError):
            fmt.inspect(path)
        try:
            fmt.verify(path, [producer.sign_pub])
            verified = True
        except TGSPError:
            verified = False
        try:
            fmt.unpack(
                path, recipient_key=customer.recipient, trusted_signers=[producer.sign_pub], destination=root / "out"
            )
        except TGSPError:
            assert listing(root) == ["p.tgsp"], "a failed unpack left files behind"
            assert mutated != original
            return
        assert verified
        assert mutated == original, "a modified package was accepted"
        assert {p: (root / "out" / p).read_bytes() for p in files} == files


@settings(max_examples=150, deadline=None, database=None)
@given(data=st.data())
def test_the_manifest_parser_fails_only_with_tgsp_errors(
    data: st.DataObject, small_package: tuple[bytes, dict[str, bytes]]
) -> None:
    """inspect parses unverified manifests, so the parser itself must be robust to any input."""
    original, _ = small_package
    start = fmt.HEADER_LEN
    end = start + fmt.HEADER.unpack(original[: fmt.HEADER_LEN])[3]
    manifest = original[start:end]
    mutated = _apply(manifest, data.draw(st.lists(_mutation(len(manifest)), min_size=1, max_size=4)))
    with contextlib.suppress(TGSPError):
        assert isinstance(fmt.decode_manifest(mutated), dict)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=100, deadline=None, database=None)
@given(field=st.sampled_from(sorted(fmt.MANIFEST_KEYS)), value=json_values)
def test_manifest_validation_fails_only_with_tgsp_errors(
    field: str, value: object, small_package: tuple[bytes, dict[str, bytes]]
) -> None:
    original, _ = small_package
    start = fmt.HEADER_LEN
    end = start + fmt.HEADER.unpack(original[: fmt.HEADER_LEN])[3]
    manifest = fmt.decode_manifest(original[start:end])
    manifest[field] = value
    with contextlib.suppress(TGSPError):
        assert isinstance(fmt.validate_manifest(manifest), dict)
