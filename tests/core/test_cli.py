"""The tensafe CLI: exit codes, messages, JSON output and plugin commands."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from tensafe.cli.main import cli
from tensafe.testing import fresh_plugin_manager
from tests.core.test_plugins import run_cli
from tests.mocks.registrations import GreetCommandPlugin


def write_config(tmp_path: Path, dataset: Path, steps: int = 15) -> Path:
    path = tmp_path / "bigram.yaml"
    path.write_text(
        f"backend: bigram\noutput_dir: {tmp_path / 'runs'}\ndata:\n  path: {dataset}\n"
        f"dp:\n  enabled: false\noptimizer:\n  learning_rate: 0.1\ntraining:\n  steps: {steps}\n"
        "sampling:\n  max_tokens: 8\n  temperature: 0\n"
    )
    return path


def test_run_with_only_core_backends_says_what_to_install() -> None:
    result = run_cli("run", env={"TENSAFE_LOAD_PLUGINS": ""})
    assert result.returncode == 2
    assert "no ML backend 'torch' installed; python -m pip install ./tensafe-torch" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_without_a_backend_says_what_to_install() -> None:
    result = run_cli("serve", env={"TENSAFE_LOAD_PLUGINS": ""})
    assert result.returncode == 2 and "pip install ./tensafe-torch" in result.stderr


def test_a_third_party_backend_is_selected_by_name_through_a_config(qa_dataset: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path, qa_dataset)
    result = run_cli("run", str(config), "--run-name", "r1")
    assert result.returncode == 0, result.stderr
    assert "held-out loss:" in result.stdout and "privacy: NONE" in result.stdout
    report = json.loads((tmp_path / "runs" / "r1" / "report.json").read_text())
    assert report["backend"] == "bigram" and report["steps"] == 15
    assert report["held_out_loss"]["after"] < report["held_out_loss"]["before"]
    assert "training" in result.stderr, "a progress bar is drawn on stderr"

    generated = run_cli(
        "inference",
        str(config),
        "-p",
        "item 2: colour?",
        "--adapter",
        str(tmp_path / "runs" / "r1" / "adapter"),
        "--json",
        "-n",
        "2",
    )
    assert generated.returncode == 0, generated.stderr
    [response] = json.loads(generated.stdout)
    assert len(response["sequences"]) == 2
    assert all(len(s["tokens"]) <= 8 for s in response["sequences"])


def test_train_json_report_and_step_override(qa_dataset: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path, qa_dataset)
    runner = CliRunner()
    pm = fresh_plugin_manager(autoload=True)
    result = runner.invoke(cli, ["train", str(config), "--steps", "3", "--json"], obj={"pm": pm})
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["steps"] == 3 and report["held_out_loss"] is None


def test_bad_config_gives_field_errors_and_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("training:\n  steps: -4\nmodle: {}\n")
    for command in (["config", "validate", str(path)], ["run", str(path)]):
        result = run_cli(*command)
        assert result.returncode == 2
        assert "training.steps" in result.stderr and "modle" in result.stderr
        assert "Traceback" not in result.stderr


def test_config_show_prints_every_default() -> None:
    result = run_cli("config", "show", "--format", "json")
    data = json.loads(result.stdout)
    assert set(data) >= {"model", "lora", "dp", "optimizer", "training", "data", "sampling"}


def test_inference_with_bad_sampling_option_is_a_config_error(qa_dataset: Path, tmp_path: Path) -> None:
    result = run_cli("inference", str(write_config(tmp_path, qa_dataset)), "-p", "x", "--top-p", "3")
    assert result.returncode == 2 and "sampling.top_p" in result.stderr


def test_plugins_add_commands_through_the_hook() -> None:
    pm = fresh_plugin_manager(plugins=[GreetCommandPlugin()])
    runner = CliRunner()
    help_text = runner.invoke(cli, ["--help"], obj={"pm": pm}).output
    assert "greet" in help_text and "Say hello" in help_text
    result = runner.invoke(cli, ["greet", "--name", "tensafe"], obj={"pm": pm})
    assert result.exit_code == 0 and result.output == "hello, tensafe\n"


def test_unknown_command_is_a_usage_error() -> None:
    result = run_cli("trian")
    assert result.returncode == 2 and "No such command" in result.stderr
