"""Empirical privacy auditing: a lower bound on epsilon, measured in one training run.

An accountant's epsilon is an upper bound that holds only if the
implementation does what DP-SGD says. The one-run audit of Steinke, Nasr and
Jagielski ("Privacy Auditing with One (1) Training Run", NeurIPS 2023) gives
the missing half: m canaries, each included independently with probability
1/2, go into one training run; afterwards an auditor guesses the membership of
the k canaries it is most confident about, and the number of right guesses
becomes a lower bound on epsilon that holds at a stated confidence
(:mod:`tensafe.auditing.bound`). A lower bound above the claimed epsilon means
the implementation is broken.

* :func:`audit` runs the audit on a copy of a config (:mod:`tensafe.auditing.run`);
* :func:`attach` writes its result into a run's certificate (``audited``);
* ``tensafe privacy audit`` (tensafe-privacy) is the command line, and the
  conformance suite's white-box check (:mod:`tensafe.testing.dp_audit`) uses
  the same pieces. See docs/privacy.md, "Auditing".
"""

from __future__ import annotations

from tensafe.auditing.bound import ceiling, epsilon_lower_bound, p_value
from tensafe.auditing.record import attach, config_of_run
from tensafe.auditing.run import AuditOutcome, AuditSettings, audit
from tensafe.auditing.verdict import render
from tensafe.engine.ledger import AuditSummary

__all__ = [
    "AuditOutcome",
    "AuditSettings",
    "AuditSummary",
    "attach",
    "audit",
    "ceiling",
    "config_of_run",
    "epsilon_lower_bound",
    "p_value",
    "render",
]
