"""The Dockerfile and compose.yaml at the repository root: checked without Docker, and with it when present."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return data


def test_the_dockerfile_installs_the_server_extra_and_runs_tensafe_serve() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert text.startswith("#") and "\nFROM python:3.11" in text
    assert '"./tensafe-core[server,postgres]"' in text
    for distribution in ("tensafe-torch", "tensafe-privacy", "tensafe-tgsp"):
        assert f"COPY {distribution} ./{distribution}" in text and f"./{distribution}" in text.split("pip install")[1]
    assert '"tensafe", "serve", "--host", "0.0.0.0", "--port", "8700"' in text
    assert "\nUSER tensafe\n" in text and "/readyz" in text
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignored[1] == "*" and "!tensafe-core" in ignored  # data and keys never reach the build context


def test_compose_runs_the_server_over_postgresql_with_a_volume_a_secret_and_a_readiness_check() -> None:
    services = compose()["services"]
    assert set(services) == {"server", "db"}
    server, db = services["server"], services["db"]
    assert server["build"] == "." and server["ports"] == ["127.0.0.1:8700:8700"]
    assert server["depends_on"] == {"db": {"condition": "service_healthy"}}
    assert server["environment"]["TENSAFE_DATABASE_URL"].startswith("postgresql://tensafe:")
    assert server["environment"]["TENSAFE_DATABASE_URL"].endswith("@db:5432/tensafe")
    assert server["environment"]["TENSAFE_MASTER_KEY_FILE"] == "/run/secrets/master_key"
    assert server["secrets"] == ["master_key"] and compose()["secrets"]["master_key"]["file"] == "./secrets/master.key"
    assert "server-data:/data" in server["volumes"] and "db-data:/var/lib/postgresql/data" in db["volumes"]
    assert set(compose()["volumes"]) == {"server-data", "db-data"}
    assert "http://127.0.0.1:8700/readyz" in " ".join(server["healthcheck"]["test"])
    assert "pg_isready" in " ".join(db["healthcheck"]["test"])
    assert db["image"].startswith("postgres:")


def test_the_healthcheck_command_works_against_a_live_server(live_server: Any) -> None:
    command = compose()["services"]["server"]["healthcheck"]["test"]
    assert command[:3] == ["CMD", "python", "-c"]
    script = command[3].replace("http://127.0.0.1:8700", live_server.url)
    assert subprocess.run([sys.executable, "-c", script], timeout=30).returncode == 0


def test_docker_compose_accepts_the_file(tmp_path: Path) -> None:
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("docker compose is not installed")
    env = {"TENSAFE_DB_PASSWORD": "test-only", "PATH": "/usr/bin:/bin"}
    checked = subprocess.run(
        [docker, "compose", "-f", str(ROOT / "compose.yaml"), "config", "--quiet"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stderr
