"""Train with the torch backend, package as TGSP, verify, and serve the package: identical logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tensafe.config import build_config
from tensafe.orchestrator import TenSafeOrchestrator
from tensafe.testing import fresh_plugin_manager
from tensafe.types import datum_from_sequence
from tensafe_tgsp.errors import TGSPError
from tensafe_torch import assets


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TENSAFE_STRICT_PLUGINS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "tensafe.cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("keys")
    for name in ("producer", "alice", "mallory"):
        result = cli("tgsp", "keygen", "--out", str(directory), "--name", name)
        assert result.returncode == 0, result.stderr
    return directory


def test_train_package_verify_and_serve(keys: Path, tmp_path: Path) -> None:
    config = build_config(
        {
            "backend": "torch",
            "output_dir": str(tmp_path / "runs"),
            "data": {"path": str(assets.DEFAULT_DATASET), "max_records": 300},
            "training": {"steps": 6, "batch_size": 32},
            "dp": {"accountant": "rdp", "target_epsilon": 4.0},
            "tgsp": {"signing_key": str(keys / "producer.sign.key"), "recipients": [str(keys / "alice.recipient.pub")]},
        },
        environ={},
    )
    pm = fresh_plugin_manager(autoload=True)
    trainer = TenSafeOrchestrator(config, plugin_manager=pm)
    run = trainer.prepare()
    report = trainer.run(prepared=run, evaluate=False)
    package = Path(report["package"]["path"])
    assert package.is_file() and package.parent == Path(report["run_dir"])

    verified = cli("tgsp", "verify", str(package), "--trusted", str(keys / "producer.sign.pub"))
    assert verified.returncode == 0, verified.stderr
    inspected = json.loads(cli("tgsp", "inspect", str(package), "--json").stdout)
    certificate = inspected["privacy_certificate"]
    assert certificate["epsilon"] == report["privacy"]["epsilon"] <= 4.0
    assert certificate["steps"] == 6 and certificate["accountant"] == "rdp"

    serving = build_config(
        {
            "backend": "torch",
            "tgsp": {
                "recipient_key": str(keys / "alice.recipient.key"),
                "trusted_signers": [str(keys / "producer.sign.pub")],
            },
        },
        environ={},
    )
    server = TenSafeOrchestrator(serving, plugin_manager=pm)
    served = server._inference_backend(package)
    probe = [
        datum_from_sequence(run.backend.encode("Record 1. Name: Ada Costa. Born: 1950. City: Lyon. Country: France"))
    ]
    expected = run.backend.forward(probe, "cross_entropy").loss_fn_outputs[0]["logprobs"]
    assert served.forward(probe, "cross_entropy").loss_fn_outputs[0]["logprobs"] == expected

    # A package from a signer the server does not trust is refused, unless the user loudly overrides.
    distrustful = build_config(
        {
            "backend": "torch",
            "tgsp": {
                "recipient_key": str(keys / "alice.recipient.key"),
                "trusted_signers": [str(keys / "mallory.sign.pub")],
            },
        },
        environ={},
    )
    with pytest.raises(TGSPError, match="not trusted"):
        TenSafeOrchestrator(distrustful, plugin_manager=pm)._inference_backend(package)
    prompt = "Record 1. Name: Ada Costa. Born: 1950. City: Lyon. Country:"
    refused = cli(
        "inference",
        "-p",
        prompt,
        "--adapter",
        str(package),
        "--recipient-key",
        str(keys / "alice.recipient.key"),
        "--trusted",
        str(keys / "mallory.sign.pub"),
    )
    assert refused.returncode == 2 and "not trusted" in refused.stderr and "Traceback" not in refused.stderr
    overridden = cli(
        "inference",
        "-p",
        prompt,
        "--adapter",
        str(package),
        "--recipient-key",
        str(keys / "alice.recipient.key"),
        "--insecure-allow-untrusted-signer",
        "--max-tokens",
        "6",
    )
    assert overridden.returncode == 0, overridden.stderr
    assert "WARNING" in overridden.stderr and overridden.stdout.startswith(prompt)

    # Someone who is not a recipient cannot open it.
    outsider = cli(
        "inference",
        "-p",
        prompt,
        "--adapter",
        str(package),
        "--recipient-key",
        str(keys / "mallory.recipient.key"),
        "--trusted",
        str(keys / "producer.sign.pub"),
    )
    assert outsider.returncode == 2 and "Traceback" not in outsider.stderr
