"""The privacy certificate: one typed model validates it, and ``tensafe tgsp verify | inspect`` state all of it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tensafe.engine.ledger import (
    CALLER_DUTIES,
    PRIVACY_UNIT_SESSION,
    RANDOMNESS_SECURE,
    RANDOMNESS_SEEDED,
    SAMPLING_DECLARED,
    PrivacyCertificate,
)
from tensafe_tgsp import format as fmt
from tensafe_tgsp.errors import MalformedPackage, PackError, TGSPError
from tests.tgsp.helpers import CERTIFICATE, Party, adapter_files
from tests.tgsp.test_cli import fails, ok, tgsp

DIGEST = "0123456789abcdef" + "f" * 48
SESSION_CERTIFICATE: dict[str, Any] = {
    **CERTIFICATE,
    "mode": "session",
    "privacy_unit": PRIVACY_UNIT_SESSION,
    "sampling": SAMPLING_DECLARED,
    "randomness": RANDOMNESS_SECURE,
    "reproducible_noise": False,
    "protected_set": {"records": 400, "digest": DIGEST, "source": "train.jsonl"},
    "caller_duties": list(CALLER_DUTIES),
    "outside_guarantee": ["per-step losses returned to the caller", "held-out loss of 40 eval records"],
}
NOT_PRIVATE = "reproducible noise: NOT private"


def _package(directory: Path, producer: Party, customer: Party, certificate: dict[str, Any] | None) -> Path:
    path = directory / "adapter.tgsp"
    fmt.pack(
        adapter_files(floats=64),
        path,
        signing_key=producer.signing,
        recipients=[customer.recipient_pub],
        base_model="m",
        privacy_certificate=certificate,
    )
    return path


def _shown(package: Path, producer: Party) -> tuple[str, str, dict[str, Any]]:
    """What verify and inspect print, and inspect's JSON."""
    verified = ok(tgsp("verify", package, "--trusted", producer.sign_pub))
    inspected = ok(tgsp("inspect", package))
    as_json: dict[str, Any] = json.loads(ok(tgsp("verify", package, "--trusted", producer.sign_pub, "--json")))
    return verified, inspected, as_json


def test_verify_and_inspect_state_what_a_session_certificate_says(
    tmp_path: Path, producer: Party, customer: Party
) -> None:
    package = _package(tmp_path, producer, customer, SESSION_CERTIFICATE)
    verified, inspected, as_json = _shown(package, producer)
    for text in (verified, inspected):
        assert "epsilon 2.973 at delta 1e-05" in text and "q=0.04, sigma=1.1, C=1" in text
        assert "target epsilon     3" in text
        assert "mode               session" in text
        assert f"privacy unit       {PRIVACY_UNIT_SESSION}" in text
        assert f"sampling           {SAMPLING_DECLARED}" in text
        assert f"randomness         {RANDOMNESS_SECURE}" in text
        assert f"protected set      400 records from train.jsonl, digest {DIGEST[:28]}..." in text
        for item in (*CALLER_DUTIES, *SESSION_CERTIFICATE["outside_guarantee"]):
            assert f"    - {item}" in text
        assert NOT_PRIVATE not in text and "not stated" not in text
    assert as_json["privacy_certificate"] == SESSION_CERTIFICATE
    statement = as_json["privacy_statement"]
    assert statement["not_stated"] == [] and statement["warnings"] == []
    assert statement["mode"] == "session" and statement["caller_duties"] == list(CALLER_DUTIES)
    assert statement["protected_set"]["records"] == 400 and statement["reproducible_noise"] is False


def test_an_audited_certificate_shows_the_audit_and_its_verdict(
    tmp_path: Path, producer: Party, customer: Party
) -> None:
    audited = {
        "mode": "white-box",
        "accountant": "rdp",
        "claimed_epsilon": 8.0,
        "delta": 1e-5,
        "steps": 300,
        "epsilon_lower_bound": 2.06,
        "confidence": 0.95,
        "canaries": 1000,
        "guesses": 200,
        "correct": 185,
        "ceiling": 5.62,
        "guesses_ceiling": 4.0,
        "verdict": "consistent",
    }
    package = _package(tmp_path, producer, customer, {**SESSION_CERTIFICATE, "audited": audited})
    verified, inspected, _ = _shown(package, producer)
    for text in (verified, inspected):
        assert "privacy audit (white-box, one run, Steinke-Nasr-Jagielski): epsilon >= 2.0600" in text
        assert "right 185" in text and "verdict: consistent" in text


@pytest.mark.parametrize(
    "randomness",
    [
        {"randomness": RANDOMNESS_SEEDED, "reproducible_noise": True},
        {"randomness": "seeded (no guarantee against whoever knows the seed)"},  # an older TenSafe's words
        {"reproducible_noise": True},
    ],
    ids=["seeded", "older-seeded", "flag-only"],
)
def test_seeded_noise_is_shown_as_not_private(
    randomness: dict[str, Any], tmp_path: Path, producer: Party, customer: Party
) -> None:
    package = _package(tmp_path, producer, customer, {**CERTIFICATE, **randomness})
    verified, inspected, as_json = _shown(package, producer)
    assert NOT_PRIVATE in verified and NOT_PRIVATE in inspected
    assert any(NOT_PRIVATE in w for w in as_json["privacy_statement"]["warnings"])
    assert as_json["privacy_statement"]["reproducible_noise"] is True


def test_a_certificate_from_an_older_tool_shows_what_it_does_not_state(
    tmp_path: Path, producer: Party, customer: Party
) -> None:
    package = _package(tmp_path, producer, customer, {**CERTIFICATE, "randomness": "os-csprng"})
    verified, inspected, as_json = _shown(package, producer)
    for text in (verified, inspected):
        for label in ("mode", "privacy unit", "sampling", "protected set", "caller duties", "outside guarantee"):
            assert f"  {label:<18} not stated" in text, label
        assert "randomness         os-csprng" in text and NOT_PRIVATE not in text
    statement = as_json["privacy_statement"]
    assert statement["not_stated"] == [
        "mode",
        "privacy_unit",
        "sampling",
        "protected_set",
        "caller_duties",
        "outside_guarantee",
    ]
    assert statement["warnings"] == []


def test_a_package_without_a_certificate_says_so(tmp_path: Path, producer: Party, customer: Party) -> None:
    package = _package(tmp_path, producer, customer, None)
    assert "privacy      NONE" in ok(tgsp("inspect", package))
    assert json.loads(ok(tgsp("inspect", package, "--json")))["privacy_statement"] is None


HOSTILE: list[tuple[dict[str, Any], str]] = [
    ({"steps": "300"}, "steps"),
    ({"steps": True}, "steps"),
    ({"mode": "anything"}, "mode"),
    ({"caller_duties": "draw batches"}, "caller_duties"),
    ({"caller_duties": [1, 2]}, "caller_duties.0"),
    ({"protected_set": {"records": -1, "digest": DIGEST}}, "protected_set.records"),
    ({"protected_set": {"records": 1, "digest": DIGEST, "evil\x1b[2J": 1}}, "protected_set.evil\\x1b[2J"),
    ({"sampling_rate": 0}, "sampling_rate"),
    ({"reproducible_noise": "no"}, "reproducible_noise"),
    ({"outside_guarantee": {"a": 1}}, "outside_guarantee"),
]


@pytest.mark.parametrize(("change", "field"), HOSTILE, ids=[field for _, field in HOSTILE])
def test_a_certificate_the_model_refuses_is_a_tgsp_error_naming_the_field(change: dict[str, Any], field: str) -> None:
    certificate = {**SESSION_CERTIFICATE, **change}
    with pytest.raises(PackError, match="privacy certificate: ") as packing:
        fmt.validate_certificate(certificate, error=PackError)
    assert field in str(packing.value) and "\n" not in str(packing.value) and "\x1b" not in str(packing.value)
    with pytest.raises(MalformedPackage, match="privacy certificate: "):
        fmt.validate_certificate(certificate)


@pytest.mark.parametrize(
    "certificate",
    [
        {**CERTIFICATE, "epsilon": float("nan")},
        {**CERTIFICATE, "noise_multiplier": float("inf")},
        {**CERTIFICATE, "extra": object()},
        {**CERTIFICATE, "extra": 2**70},
        {**CERTIFICATE, "extra": json.loads("[" * 200 + "]" * 200)},
        ["not", "an", "object"],
    ],
    ids=["nan", "inf", "not-json", "huge-int", "deep", "list"],
)
def test_hostile_values_fail_cleanly(certificate: Any) -> None:
    with pytest.raises(MalformedPackage, match="privacy certificate"):
        fmt.validate_certificate(certificate)


def test_the_pack_command_refuses_a_bad_certificate_in_one_line(
    tmp_path: Path, producer: Party, customer: Party
) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for name, data in adapter_files(floats=64).items():
        (adapter / name).write_bytes(data)
    bad = tmp_path / "certificate.json"
    bad.write_text(json.dumps({**SESSION_CERTIFICATE, "mode": "anything", "caller_duties": "none"}))
    result = tgsp(
        "pack", adapter, "--out", tmp_path / "p.tgsp", "--signing-key", producer.sign_key,
        "--recipient", customer.recipient_pub, "--base-model", "m", "--certificate", bad,
    )  # fmt: skip
    fails(result, "privacy certificate: mode: Input should be 'sft', 'rlvr' or 'session'; caller_duties")
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "p.tgsp").exists()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None, database=None)
@given(field=st.sampled_from(sorted(PrivacyCertificate.model_fields)), value=json_values)
def test_certificate_validation_fails_only_with_tgsp_errors(field: str, value: object) -> None:
    certificate = {**SESSION_CERTIFICATE, field: value}
    try:
        fmt.validate_certificate(certificate)
    except TGSPError as exc:
        message = str(exc)
    else:
        return
    assert message.startswith("privacy certificate") and message.isprintable()
