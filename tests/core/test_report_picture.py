"""report.html and metrics.jsonl: a DP run's curves as the release gate allows, rendered in a real browser."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from tensafe.config import build_config
from tensafe.orchestrator import TenSafeOrchestrator
from tensafe.testing import fresh_plugin_manager
from tests.mocks.accountants import LinearAccountantPlugin

CHROMIUM_ENV = "TENSAFE_TEST_CHROMIUM"


class PageShape(HTMLParser):
    """Each curve's points (by metric) and the page's scripts, as the browser's DOM has them."""

    def __init__(self) -> None:
        super().__init__()
        self.points: dict[str, list[int]] = {}
        self.metric: str | None = None
        self.scripts = 0
        self.certificate_rows: list[str] = []
        self._in_certificate = False
        self._in_th = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "svg" and found.get("data-metric"):
            self.metric = found["data-metric"]
            self.points[self.metric or ""] = []
        elif tag == "circle" and self.metric is not None:
            self.points[self.metric].append(int(found["data-step"] or 0))
        elif tag == "script":
            self.scripts += 1
        elif tag == "table" and "certificate" in (found.get("class") or ""):
            self._in_certificate = True
        elif tag == "th" and self._in_certificate:
            self._in_th = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg":
            self.metric = None
        elif tag == "table":
            self._in_certificate = False
        elif tag == "th":
            self._in_th = False

    def handle_data(self, data: str) -> None:
        if self._in_th and data.strip():
            self.certificate_rows.append(data.strip())


def chromium() -> str:
    found = os.environ.get(CHROMIUM_ENV) or shutil.which("chromium")
    if not found:
        pytest.fail(f"no Chromium: install it (scripts/chromium-for-tests.sh) or set {CHROMIUM_ENV}")
    return found


def browse(page: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", *args, page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


@pytest.fixture
def dp_run(qa_dataset: Path, tmp_path: Path) -> dict[str, Any]:
    pm = fresh_plugin_manager(plugins=[LinearAccountantPlugin()], autoload=True)
    config = build_config(
        {
            "backend": "bigram",
            "data": {"path": str(qa_dataset)},
            "optimizer": {"learning_rate": 0.1},
            "training": {"steps": 6, "batch_size": 8, "eval_every": 2},
            "dp": {"accountant": "linear-test", "noise_multiplier": 1.0, "target_epsilon": None},
        },
        environ={},
    )
    return TenSafeOrchestrator(config, plugin_manager=pm).run(run_dir=tmp_path / "r")


def test_metrics_jsonl_has_one_released_line_per_step(dp_run: dict[str, Any], tmp_path: Path) -> None:
    lines = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
    assert all(set(line) <= {"step", "epsilon", "held_out_loss"} for line in lines)
    assert [line["step"] for line in lines if "held_out_loss" in line] == [2, 4, 6]
    assert lines == dp_run["history"]


def test_report_html_renders_one_point_per_reported_step_in_a_browser(dp_run: dict[str, Any], tmp_path: Path) -> None:
    page = tmp_path / "r" / "report.html"
    dom = browse(page, "--dump-dom")
    assert "Uncaught" not in dom.stderr, "no script errors"
    shape = PageShape()
    shape.feed(dom.stdout)
    assert shape.scripts == 0, "the page is self-contained: no script"
    assert shape.points["epsilon"] == [1, 2, 3, 4, 5, 6]
    assert shape.points["held_out_loss"] == [2, 4, 6]
    assert "loss" not in shape.points, "under DP no training loss leaves the run"
    assert {"epsilon", "delta", "privacy_unit", "outside_guarantee"} <= set(shape.certificate_rows)
    assert "outside the privacy guarantee" in dom.stdout
    shot = tmp_path / "report.png"
    browse(page, f"--screenshot={shot}", "--window-size=1280,1400")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
