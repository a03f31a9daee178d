"""The manifest's privacy certificate, checked as TenSafe's typed :class:`PrivacyCertificate`."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from tensafe.engine.ledger import PrivacyCertificate
from tensafe_tgsp._canonical import canonical_json
from tensafe_tgsp.errors import MalformedPackage, TGSPError
from tensafe_tgsp.format.spec import MAX_CERTIFICATE_PROBLEMS


def one_line(text: str) -> str:
    """``text`` with every unprintable character escaped: package content must not steer a terminal."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _field(loc: tuple[int | str, ...]) -> str:
    """Where a certificate problem is, on one line whatever names the certificate uses."""
    return ".".join(one_line(str(part)[:64]) for part in loc) or "the certificate"


def parse_certificate(certificate: Any, *, error: type[TGSPError] = MalformedPackage) -> PrivacyCertificate:
    """A privacy certificate as the typed :class:`~tensafe.engine.ledger.PrivacyCertificate`.

    Any JSON object with at least accountant, epsilon, delta and steps, every
    field it states of the right type and range; fields the model does not
    know are kept. Anything else raises ``error`` naming the fields at fault.
    """
    if not isinstance(certificate, dict):
        raise error("privacy certificate must be a JSON object")
    # Canonical JSON first: it refuses NaN, non-JSON values and deep nesting with
    # a TGSP error, and strict JSON validation then refuses true as a step count.
    try:
        data = canonical_json(certificate, error=error, what="privacy certificate")
    except TGSPError as exc:
        raise error(one_line(str(exc))) from None
    try:
        return PrivacyCertificate.model_validate_json(data, strict=True)
    except ValidationError as exc:
        problems = [
            f"{_field(problem['loc'])}: {problem['msg']}"
            for problem in exc.errors(include_url=False, include_input=False)[:MAX_CERTIFICATE_PROBLEMS]
        ]
        more = exc.error_count() - len(problems)
        raise error(
            "privacy certificate: " + "; ".join(problems) + (f" (and {more} more)" if more > 0 else "")
        ) from None


def validate_certificate(certificate: Any, *, error: type[TGSPError] = MalformedPackage) -> dict[str, Any]:
    """Check a privacy certificate (see :func:`parse_certificate`); returns it unchanged."""
    parse_certificate(certificate, error=error)
    checked: dict[str, Any] = certificate
    return checked
