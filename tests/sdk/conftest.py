"""Fixtures for the SDK tests."""

from __future__ import annotations

from tests.serving import database, live_server  # noqa: F401  (fixtures)
