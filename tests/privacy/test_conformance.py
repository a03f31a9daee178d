"""Each tensafe-privacy accountant passes the core conformance suite."""

from tensafe.testing import PrivacyAccountantConformance


class TestRdpConformance(PrivacyAccountantConformance):
    accountant_name = "rdp"


class TestPldConformance(PrivacyAccountantConformance):
    accountant_name = "pld"
