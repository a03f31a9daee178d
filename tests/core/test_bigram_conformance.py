"""The third-party-style plugin under tests/plugins passes the conformance suite."""

from __future__ import annotations

from tensafe.testing import MLBackendConformance


class TestBigramConformance(MLBackendConformance):
    backend_name = "bigram"
