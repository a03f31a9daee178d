"""The manifest's usage policy: ``not_after`` and ``allowed_base_models``, and their enforcement."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from tensafe_tgsp.errors import PackError, PolicyViolation
from tensafe_tgsp.format.spec import DATE, TIMESTAMP


def parse_not_after(value: str) -> dt.datetime:
    """The first instant at which a package with this ``not_after`` is expired."""
    if DATE.fullmatch(value):
        day = dt.date.fromisoformat(value)
        last, step = dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC), dt.timedelta(days=1)
    elif TIMESTAMP.fullmatch(value):
        last, step = dt.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC), dt.timedelta(seconds=1)
    else:
        raise ValueError(value)
    try:
        return last + step
    except OverflowError:
        return dt.datetime.max.replace(tzinfo=dt.UTC)


def normalize_not_after(value: str | dt.date | dt.datetime) -> str:
    """``YYYY-MM-DD`` (valid through that UTC day) or ``YYYY-MM-DDTHH:MM:SSZ`` (valid through that second)."""
    try:
        if isinstance(value, str):
            if DATE.fullmatch(value):
                return dt.date.fromisoformat(value).isoformat()
            value = dt.datetime.fromisoformat(value)
        if isinstance(value, dt.datetime):
            if value.tzinfo is None or value.utcoffset() is None:
                raise PackError(f"not_after {value.isoformat()!r} needs a time zone (or give a date)")
            return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        if isinstance(value, dt.date):
            return value.isoformat()
    except ValueError:
        pass
    raise PackError(f"not_after {value!r} is not an ISO date (YYYY-MM-DD) or a date-time with a time zone")


def check_policy(manifest: Mapping[str, Any], *, now: dt.datetime | None = None, base_model: str | None = None) -> None:
    """Enforce the manifest's signed policy; raises :class:`PolicyViolation`.

    ``not_after``: a date is valid through the end of that UTC day, a time
    through that second. ``allowed_base_models``: the manifest's own base model
    and ``base_model`` (the model the caller will load the adapter onto), when
    given, must be listed. Without that list, ``base_model`` must equal the
    manifest's base model id.
    """
    base_id = manifest["base_model"]["id"]
    policy = manifest.get("policy") or {}
    moment = now or dt.datetime.now(dt.UTC)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    not_after = policy.get("not_after")
    if not_after is not None and moment >= parse_not_after(not_after):
        raise PolicyViolation(
            f"the package expired: its policy allows use until {not_after} "
            f"(now {moment.astimezone(dt.UTC):%Y-%m-%dT%H:%M:%SZ})"
        )
    allowed = policy.get("allowed_base_models")
    if allowed is not None and base_id not in allowed:
        raise PolicyViolation(f"the package's base model {base_id!r} is not in its allowed_base_models {allowed}")
    permitted = allowed if allowed is not None else [base_id]
    if base_model is not None and base_model not in permitted:
        raise PolicyViolation(f"base model {base_model!r} is not allowed for this package (allowed: {permitted})")
