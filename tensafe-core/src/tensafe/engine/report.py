"""The run report: what ``report.json`` holds and how ``report.txt`` reads.

Values reach the report only through the release gate (:mod:`tensafe.engine.gate`);
this module only writes and renders them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

REPORT_MARKS = 6
OUTSIDE_LABEL = "outside the privacy guarantee"


METRICS = "metrics.jsonl"


def write_report(run_dir: Path, report: dict[str, Any]) -> None:
    """``report.json``, ``report.txt`` and ``report.html`` in ``run_dir``."""
    from tensafe.engine.picture import write_html

    _replace(run_dir / "report.json", json.dumps(report, indent=2, default=str) + "\n")
    _replace(run_dir / "report.txt", render_report(report))
    write_html(run_dir, report)


def _replace(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all: a process killed mid-write leaves the previous file, never half of one."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def append_metrics(run_dir: Path, released: dict[str, float]) -> None:
    """One line of ``metrics.jsonl``: a step's released metrics, as it ends."""
    with (run_dir / METRICS).open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(released) + "\n")


def rewrite_metrics(run_dir: Path, history: list[dict[str, float]]) -> None:
    """``metrics.jsonl`` as of a checkpoint's history (a resume drops steps the checkpoint did not keep)."""
    (run_dir / METRICS).write_text("".join(json.dumps(h) + "\n" for h in history), encoding="utf-8")


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _marks(points: list[tuple[int, float]], count: int = REPORT_MARKS) -> list[tuple[int, float]]:
    """At most ``count`` evenly spread points of a curve, first and last included."""
    count = min(count, len(points))
    picks = sorted({round(i * (len(points) - 1) / max(1, count - 1)) for i in range(count)})
    return [points[i] for i in picks]


def _privacy_lines(report: dict[str, Any]) -> list[str]:
    privacy = report.get("privacy")
    if not privacy:
        return ["  privacy: NONE (trained without differential privacy)"] if report.get("status") == "completed" else []
    lines = [
        f"  privacy: epsilon {privacy['epsilon']:.4f} at delta {privacy['delta']:.3g} "
        f"({privacy['accountant']} accountant, {privacy['steps']} steps, q={privacy['sampling_rate']:.4g}, "
        f"sigma={privacy['noise_multiplier']:.4g}, C={privacy.get('max_grad_norm', 'not stated')})"
    ]
    if privacy.get("reproducible_noise"):
        lines.append("  NOISE IS REPRODUCIBLE (dp.secure_rng: false): this run is NOT private")
    if privacy.get("privacy_unit"):
        lines.append(f"  privacy unit: {privacy['privacy_unit']}")
    protected = privacy.get("protected_set")
    if protected:
        lines.append(f"  protected: {protected['records']} training records ({protected['digest'][:28]}...)")
    for item in privacy.get("outside_guarantee", []):
        lines.append(f"  {OUTSIDE_LABEL}: {item}")
    if privacy.get("audited"):
        lines.extend(f"  {line}" for line in render_audit(privacy["audited"]))
    return lines


def render_audit(audit: dict[str, Any]) -> list[str]:
    """A privacy audit (the certificate's ``audited`` section) in a few lines: claimed, measured, verdict."""
    return [
        f"privacy audit ({audit['mode']}, one run, Steinke-Nasr-Jagielski): epsilon >= "
        f"{audit['epsilon_lower_bound']:.4f} at {audit['confidence']:.0%} confidence (delta {audit['delta']:.3g})",
        f"  claimed: epsilon {audit['claimed_epsilon']:.4f} ({audit['accountant']} accountant, {audit['steps']} steps)",
        f"  canaries m = {audit['canaries']}, guesses k = {audit['guesses']}, right {audit['correct']}; "
        f"ceiling for m = {audit['ceiling']:.4f}, for k = {audit['guesses_ceiling']:.4f}",
        f"  verdict: {audit['verdict']}",
    ]


def render_report(report: dict[str, Any]) -> str:
    """A readable summary of a run report."""
    lines = [f"TenSafe run {report['run_id']}: {report['status']}"]
    if "error" in report:
        lines.append(f"  error: {report['error']}")
    for key in ("backend", "model", "device", "dtype", "data", "records", "steps", "seconds"):
        if key in report:
            lines.append(f"  {key}: {_fmt(report[key])}")
    private = bool(report.get("privacy"))
    label = f" ({OUTSIDE_LABEL})" if private else ""
    for key, name in (("held_out_loss", "held-out loss"), ("held_out_reward", "held-out reward")):
        value = report.get(key)
        if value:
            lines.append(f"  {name}: {_fmt(value['before'])} -> {_fmt(value['after'])}{label}")
    history = report.get("history", [])
    curves = (
        ("held_out_loss", "held-out loss by step"),
        ("held_out_reward", "held-out reward by step"),
        ("reward", "rollout reward by step"),
        ("loss", "training loss by step"),
    )
    for key, name in curves:
        curve = [(int(h["step"]), h[key]) for h in history if key in h]
        if curve:
            outside = label if key.startswith("held_out") else ""
            lines.append(f"  {name}{outside}: " + ", ".join(f"{step}: {value:.3f}" for step, value in _marks(curve)))
    spent = [(int(h["step"]), h["epsilon"]) for h in history if "epsilon" in h]
    if private and spent:
        lines.append("  epsilon by step: " + ", ".join(f"{step}: {eps:.3f}" for step, eps in _marks(spent)))
    lines.extend(_privacy_lines(report))
    samples = report.get("samples", [])
    if samples:
        lines.append(f"  samples ({report.get('sample_prompts', 'prompts')}):")
    for sample in samples:
        lines.append(f"  prompt: {sample['prompt']!r}")
        lines.append(f"    before: {sample['before']!r}")
        lines.append(f"    after:  {sample['after']!r}")
    return "\n".join(lines) + "\n"
