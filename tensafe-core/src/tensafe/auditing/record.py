"""Writing an audit into a run: the certificate's ``audited`` section in report.json, and report.txt.

An audit is written only into a run it describes: the config it trained must
agree with the run's on everything that shapes the guarantee, and its training
records must be the run's protected set (checked against the certificate's
digest when the run's key is at hand, else by their number).

A black-box audit trains a second copy on the run's records, so its result is
a release about them: it is covered by the audit run's own epsilon, not the
run's, and the certificate's ``outside_guarantee`` says so. A white-box audit
trains on canaries alone and releases nothing about the records.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from tensafe.config import RunConfig
from tensafe.data import records_digest
from tensafe.engine.ledger import PrivacyCertificate
from tensafe.engine.loop import PROTECTED_SET_KEY
from tensafe.engine.report import write_report
from tensafe.errors import UsageError

if TYPE_CHECKING:
    from tensafe.auditing.run import AuditOutcome
    from tensafe.data import Record

#: Settings that shape a run's guarantee; an audit must share them with the run it is written into.
GUARANTEE_SETTINGS = (
    "backend",
    "mode",
    "model.path",
    "data.path",
    "data.max_records",
    "data.eval_fraction",
    "data.eval_path",
    "dp.target_epsilon",
    "dp.target_delta",
    "dp.max_grad_norm",
    "dp.accountant",
    "training.steps",
    "training.batch_size",
)
#: How the certificate's ``outside_guarantee`` item about a black-box audit begins.
AUDIT_RELEASE = "the privacy audit ('audited')"


def _report(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "report.json"
    if not path.is_file():
        raise UsageError(f"{run_dir} holds no report.json: not a TenSafe run directory")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path} is not a readable report: {exc}") from None
    if not isinstance(report, dict):
        raise UsageError(f"{path} is not a TenSafe run report")
    if not report.get("privacy"):
        raise UsageError(f"the run in {run_dir} was trained without DP: it claims no epsilon to audit")
    if not isinstance(report.get("config"), dict):
        raise UsageError(f"{path} records no config")
    return report


def _setting(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def config_of_run(run_dir: Path) -> RunConfig:
    """The config a run recorded, its calibrated noise multiplier dropped when it had a budget to calibrate to."""
    recorded = dict(_report(run_dir)["config"])
    dp = dict(recorded.get("dp") or {})
    if dp.get("target_epsilon") is not None:
        dp["noise_multiplier"] = None  # the audit calibrates for its own run
    try:
        return RunConfig.model_validate({**recorded, "dp": dp})
    except ValidationError as exc:
        raise UsageError(f"the config recorded in {run_dir / 'report.json'} is not valid here: {exc}") from None


def _check_settings(run_dir: Path, recorded: dict[str, Any], config: RunConfig) -> None:
    audited = config.model_dump(mode="json")
    settings = list(GUARANTEE_SETTINGS)
    if config.dp.noise_multiplier is not None:
        settings.append("dp.noise_multiplier")
    for dotted in settings:
        mine, theirs = _setting(audited, dotted), _setting(recorded, dotted)
        if mine != theirs:
            raise UsageError(
                f"the audited config has {dotted} = {mine!r}, the run in {run_dir} {theirs!r}: audit the run's own "
                "config (omit CONFIG) or the config it was trained with"
            )


def _check_records(run_dir: Path, certificate: PrivacyCertificate, records: list[Record]) -> None:
    protected = certificate.protected_set
    if protected is None:
        return
    key = run_dir / PROTECTED_SET_KEY
    if key.is_file():
        same = records_digest(records, key.read_bytes()) == protected.digest
    else:
        same = len(records) == protected.records
    if not same:
        raise UsageError(
            f"the audit's training records are not the protected set of the run in {run_dir} "
            f"({len(records)} records audited, {protected.records} protected)"
        )


def attach(run_dir: Path, outcome: AuditOutcome, config: RunConfig) -> PrivacyCertificate:
    """Write the audit into the run's certificate (report.json) and report.txt; returns the new certificate."""
    report = _report(run_dir)
    certificate = PrivacyCertificate.model_validate(report["privacy"])
    _check_settings(run_dir, report["config"], config)
    _check_records(run_dir, certificate, outcome.records)
    summary = outcome.summary
    outside = [item for item in certificate.outside_guarantee if not item.startswith(AUDIT_RELEASE)]
    if summary.mode == "black-box":
        outside.append(
            f"{AUDIT_RELEASE}: computed from a separate training run on the same records, which is "
            f"({summary.claimed_epsilon:.4g}, {summary.delta:.3g})-DP on its own; the adapter and the audit "
            f"together are ({certificate.epsilon + summary.claimed_epsilon:.4g}, "
            f"{certificate.delta + summary.delta:.3g})-DP"
        )
    updated = certificate.model_copy(update={"audited": summary, "outside_guarantee": outside})
    report["privacy"] = updated.to_json()
    write_report(run_dir, report)  # report.txt and report.html show the audit with the certificate
    return updated
