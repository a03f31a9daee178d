"""The third-party-style plugin under tests/plugins passes the conformance suite."""

from tensafe.testing import MLBackendConformance


class TestBigramConformance(MLBackendConformance):
    backend_name = "bigram"
