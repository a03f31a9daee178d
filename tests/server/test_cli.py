"""The serve, keys and audit commands stay import-light; the SDK names what to install."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HELP_CHECK = """
import json, sys
from click.testing import CliRunner
import tensafe
from tensafe.cli.main import cli
outputs = [CliRunner().invoke(cli, args) for args in (["--help"], ["keys", "--help"], ["audit", "--help"])]
assert all(o.exit_code == 0 for o in outputs), [o.output for o in outputs]
heavy = ("fastapi", "starlette", "sqlalchemy", "httpx", "uvicorn", "cryptography", "torch")
print(json.dumps({"heavy": sorted(m for m in heavy if m in sys.modules), "help": outputs[0].output}))
"""

NO_HTTPX = """
import sys
from pathlib import Path
sys.modules["httpx"] = None  # as if it were not installed
from tensafe.errors import MissingDependencyError
from tensafe.sdk import TenSafeClient
try:
    TenSafeClient("http://127.0.0.1:1", "tsk_a_b")
except MissingDependencyError as exc:
    print(exc)
"""


def test_help_and_the_server_commands_import_nothing_heavy() -> None:
    result = subprocess.run([sys.executable, "-c", HELP_CHECK], capture_output=True, text=True, check=True)
    report = json.loads(result.stdout)
    assert report["heavy"] == []
    assert all(name in report["help"] for name in ("serve", "keys", "audit"))


def test_the_remote_client_without_httpx_says_what_to_install() -> None:
    result = subprocess.run([sys.executable, "-c", NO_HTTPX], capture_output=True, text=True, check=True)
    assert "python -m pip install './tensafe-core[client]'" in result.stdout


def test_sdk_names_are_importable_from_tensafe_lazily() -> None:
    code = "import sys, tensafe; a = 'tensafe.sdk' in sys.modules; from tensafe import TenSafeClient; print(a)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def _tensafe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tensafe.cli.main", *args], capture_output=True, text=True)


def test_an_unusable_database_url_is_a_clear_error_not_a_traceback(tmp_path: Path) -> None:
    result = _tensafe("keys", "create", "alice", "--data-dir", str(tmp_path / "data"), "--database", "nosuch://x")
    assert result.returncode == 2
    assert "database URL not usable" in result.stderr
    assert "Traceback" not in result.stderr


def test_reading_a_data_directory_that_does_not_exist_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "typo"
    for args in (["audit", "verify"], ["keys", "list"]):
        result = _tensafe(*args, "--data-dir", str(missing))
        assert result.returncode == 2, (args, result.stderr)
        assert "no TenSafe server data" in result.stderr
        assert "Traceback" not in result.stderr
    assert not missing.exists()  # nothing, not even a fresh master key, was created


def test_serve_passes_its_he_mask_workers_to_the_he_sessions(tmp_path: Path) -> None:
    from tensafe.server.app import create_app
    from tensafe.server.service import SessionService
    from tensafe.testing import fresh_plugin_manager

    bad = _tensafe("serve", "--he-mask-workers", "-1", "--data-dir", str(tmp_path / "data"))
    assert bad.returncode == 2 and "--he-mask-workers" in bad.stderr and "Traceback" not in bad.stderr
    service = SessionService(tmp_path / "data", plugin_manager=fresh_plugin_manager(autoload=True))
    try:
        assert create_app(service, he_mask_workers=3).state.he_sessions.mask_workers == 3
    finally:
        service.close()
