"""TenSafe's conformance suite: test mixins that any plugin's tests subclass.

A plugin proves it honours a contract with a few one-line classes::

    from tensafe.testing import MLBackendConformance

    class TestMyBackend(MLBackendConformance):
        backend_name = "my-backend"

Each mixin looks its object up by name through a freshly built plugin manager
(so registration is tested too) and runs the tests for the interface plus
those for every capability the object declares (see :mod:`tensafe.capabilities`).
Override the ``run_config`` / ``adam_params`` methods (``dp_run_config`` for
the DP-SGD checks) when your backend needs other settings. Requires pytest and
dp-accounting (``python -m pip install './tensafe-core[testing]'``).

The suite checks privacy, not only shapes: an ML backend declaring ``dp_sgd``
must clip, noise and seed as DP-SGD requires (:class:`DPSGDConformance`, which
:class:`MLBackendConformance` includes) and, when it declares
``gradient_canaries``, pass a white-box privacy audit (:class:`DPAuditConformance`),
and, when it declares ``distributed``, add the noise once for all its workers and
sum their clipped gradients (:class:`DistributedConformance`, two worker processes);
an accountant must never report less than a reference lower bound
(:class:`PrivacyAccountantConformance`).
See docs/plugins.md, "Proving DP-SGD".
"""

from __future__ import annotations

from tensafe.testing.accountant import PrivacyAccountantConformance
from tensafe.testing.distributed import DistributedConformance
from tensafe.testing.dp_audit import DPAuditConformance
from tensafe.testing.dp_sgd import DPSGDConformance
from tensafe.testing.he_backend import HEBackendConformance
from tensafe.testing.ml_backend import MLBackendConformance
from tensafe.testing.support import fresh_plugin_manager, requires_capability
from tensafe.testing.tgsp_loader import TGSPLoaderConformance

__all__ = [
    "DPAuditConformance",
    "DPSGDConformance",
    "DistributedConformance",
    "HEBackendConformance",
    "MLBackendConformance",
    "PrivacyAccountantConformance",
    "TGSPLoaderConformance",
    "fresh_plugin_manager",
    "requires_capability",
]
