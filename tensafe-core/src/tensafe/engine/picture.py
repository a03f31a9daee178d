"""``report.html``: a run's curves and its privacy certificate, in one self-contained page.

The page is drawn from the report alone, which holds only what the release
gate let out: under DP the curves are epsilon and held-out values (labelled
outside the guarantee), never a training batch's loss. Inline SVG and CSS, no
script and nothing fetched, so it opens anywhere, offline.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from tensafe.engine.report import OUTSIDE_LABEL

WIDTH, HEIGHT, PAD = 560, 220, 44
#: (history key, title, whether it is computed from held-out records).
CURVES = (
    ("epsilon", "epsilon spent", False),
    ("loss", "training loss (no DP: released as measured)", False),
    ("reward", "rollout reward (no DP: released as measured)", False),
    ("held_out_loss", "held-out loss", True),
    ("held_out_reward", "held-out reward", True),
)
STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 1.6em; }
.curves { display: flex; flex-wrap: wrap; gap: 1.5em; }
figure { margin: 0; } figcaption { font-weight: 600; margin-bottom: .3em; }
.outside { color: #9a3412; font-weight: 400; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: .25em .6em; text-align: left; }
th { background: #f4f4f5; } .warning { color: #b91c1c; font-weight: 700; }
svg text { font-size: 11px; fill: #444; } svg .line { fill: none; stroke: #2563eb; stroke-width: 2; }
svg circle { fill: #2563eb; } svg .axis { stroke: #999; }
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _chart(key: str, points: list[tuple[float, float]]) -> str:
    """An SVG line chart, one circle per point (``data-step`` names its step)."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if y1 == y0:
        y0, y1 = y0 - 1, y1 + 1
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1

    def sx(x: float) -> float:
        return PAD + (x - x0) / (x1 - x0) * (WIDTH - 2 * PAD)

    def sy(y: float) -> float:
        return HEIGHT - PAD + (y - y0) / (y1 - y0) * (2 * PAD - HEIGHT)

    path = " ".join(f"{'M' if i == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for i, (x, y) in enumerate(points))
    dots = "".join(
        f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" data-step="{int(x)}" data-value="{y:.6g}">'
        f"<title>step {int(x)}: {y:.4g}</title></circle>"
        for x, y in points
    )
    axes = (
        f'<line class="axis" x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - PAD}" y2="{HEIGHT - PAD}"/>'
        f'<line class="axis" x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{HEIGHT - PAD}"/>'
        f'<text x="{PAD}" y="{HEIGHT - PAD + 16}">{int(x0)}</text>'
        f'<text x="{WIDTH - PAD}" y="{HEIGHT - PAD + 16}" text-anchor="end">step {int(x1)}</text>'
        f'<text x="{PAD - 4}" y="{HEIGHT - PAD}" text-anchor="end">{y0:.3g}</text>'
        f'<text x="{PAD - 4}" y="{PAD + 4}" text-anchor="end">{y1:.3g}</text>'
    )
    return (
        f'<svg class="curve" data-metric="{_esc(key)}" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img">{axes}<path class="line" d="{path}"/>{dots}</svg>'
    )


def _curves(report: dict[str, Any]) -> str:
    private = bool(report.get("privacy"))
    figures = []
    for key, title, held_out in CURVES:
        points = [
            (float(h["step"]), float(h[key]))
            for h in report.get("history", [])
            if key in h and isinstance(h[key], int | float) and math.isfinite(h[key])
        ]
        if not points:
            continue
        label = f' <span class="outside">({OUTSIDE_LABEL})</span>' if held_out and private else ""
        figures.append(f"<figure><figcaption>{_esc(title)}{label}</figcaption>{_chart(key, points)}</figure>")
    return f'<div class="curves">{"".join(figures)}</div>' if figures else "<p>No steps were taken.</p>"


def _before_after(report: dict[str, Any]) -> str:
    rows = []
    for key, name in (("held_out_loss", "held-out loss"), ("held_out_reward", "held-out reward")):
        value = report.get(key)
        if isinstance(value, dict):
            rows.append(
                f"<tr><th>{name}</th><td>{_esc(value.get('before'))}</td><td>{_esc(value.get('after'))}</td></tr>"
            )
    if not rows:
        return ""
    label = f' <span class="outside">({OUTSIDE_LABEL})</span>' if report.get("privacy") else ""
    return (
        f"<h2>Before and after{label}</h2><table><tr><th></th><th>before</th><th>after</th></tr>{''.join(rows)}</table>"
    )


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return "<ul>" + "".join(f"<li>{_esc(v)}</li>" for v in value) + "</ul>" if value else "none"
    if isinstance(value, dict):
        return ", ".join(f"{_esc(k)}: {_esc(v)}" for k, v in value.items())
    return _esc(value)


def _certificate(report: dict[str, Any]) -> str:
    privacy = report.get("privacy")
    if not privacy:
        return '<h2>Privacy</h2><p class="warning">NONE: trained without differential privacy.</p>'
    warning = ""
    if privacy.get("reproducible_noise"):
        warning = '<p class="warning">Noise is reproducible (dp.secure_rng: false): this run is NOT private.</p>'
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_cell(v)}</td></tr>" for k, v in privacy.items())
    return f'<h2>Privacy certificate</h2>{warning}<table class="certificate">{rows}</table>'


def render_html(report: dict[str, Any]) -> str:
    """The whole page for ``report``."""
    facts = "".join(
        f"<tr><th>{key}</th><td>{_cell(report[key])}</td></tr>"
        for key in ("status", "backend", "model", "device", "dtype", "data", "records", "steps", "seconds", "error")
        if key in report
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>TenSafe run {_esc(report.get('run_id'))}</title><style>{STYLE}</style></head><body>"
        f"<h1>TenSafe run {_esc(report.get('run_id'))}: {_esc(report.get('status'))}</h1>"
        f"<table>{facts}</table><h2>By step</h2>{_curves(report)}{_before_after(report)}{_certificate(report)}"
        "</body></html>\n"
    )


def write_html(run_dir: Path, report: dict[str, Any]) -> Path:
    path = run_dir / "report.html"
    path.write_text(render_html(report), encoding="utf-8")
    return path
