"""seal-ckks passes the HE backend conformance suite."""

from __future__ import annotations

from tensafe.testing import HEBackendConformance


class TestSealCKKS(HEBackendConformance):
    backend_name = "seal-ckks"
