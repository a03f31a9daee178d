"""tensafe privacy epsilon | calibrate | plan."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from tensafe.cli.main import cli
from tensafe.testing import fresh_plugin_manager
from tensafe_privacy.accountants import PldAccountant, RdpAccountant
from tests.mocks.accountants import LinearAccountantPlugin
from tests.mocks.misbehaving_plugins import BrokenAccountantPlugin


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["privacy", *args], obj={"pm": fresh_plugin_manager(autoload=True)})
    return result.exit_code, result.stdout, result.stderr


def test_epsilon_json_equals_the_accountant() -> None:
    code, out, _ = invoke("epsilon", "-q", "0.04", "-s", "1.5", "-t", "2250", "--delta", "1e-5", "--json")
    assert code == 0
    data = json.loads(out)
    expected = RdpAccountant()
    expected.compose_step(0.04, 1.5, 2250)
    assert data["epsilon"] == expected.get_epsilon(1e-5)
    assert data["accountant"] == "rdp" and data["steps"] == 2250


def test_epsilon_text_with_the_prv_alias() -> None:
    code, out, _ = invoke("epsilon", "-q", "0.04", "-s", "1.5", "-t", "2250", "--delta", "1e-5", "--accountant", "prv")
    expected = PldAccountant()
    expected.compose_step(0.04, 1.5, 2250)
    assert code == 0 and f"epsilon = {expected.get_epsilon(1e-5):.4f}" in out


def test_calibrate_and_plan_agree() -> None:
    code, out, _ = invoke("calibrate", "-e", "3", "-q", "0.01", "-t", "1000", "--delta", "1e-5", "--json")
    assert code == 0
    calibrated = json.loads(out)
    assert calibrated["epsilon"] <= 3.0
    code, out, _ = invoke(
        "plan", "-e", "3", "-q", "0.01", "-s", str(calibrated["noise_multiplier"]), "--delta", "1e-5", "--json"
    )
    assert code == 0
    assert json.loads(out)["max_steps"] >= 1000


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["epsilon", "-q", "1.5", "-s", "1", "-t", "3", "--delta", "1e-5"], "--sampling-rate"),
        (["epsilon", "-q", "0.1", "-s", "nan", "-t", "3", "--delta", "1e-5"], "--noise-multiplier"),
        (["epsilon", "-q", "0.1", "-s", "-2", "-t", "3", "--delta", "1e-5"], "--noise-multiplier"),
        (["epsilon", "-q", "0.1", "-s", "1", "-t", "-3", "--delta", "1e-5"], "--steps"),
        (["epsilon", "-q", "0.1", "-s", "1", "-t", "3", "--delta", "1"], "--delta"),
        (["calibrate", "-e", "0", "-q", "0.1", "-t", "3", "--delta", "1e-5"], "--epsilon"),
        (["plan", "-e", "3", "-q", "0.1", "-s", "1"], "--delta"),
    ],
)
def test_bad_input_names_the_parameter_and_exits_2(args: list[str], names: str) -> None:
    code, _, err = invoke(*args)
    assert code == 2
    assert names in err


def test_unknown_accountant_lists_the_available_ones() -> None:
    result = CliRunner().invoke(
        cli,
        ["privacy", "epsilon", "-q", "0.1", "-s", "1", "-t", "3", "--delta", "1e-5", "--accountant", "gdp"],
        obj={"pm": fresh_plugin_manager(autoload=True)},
    )
    assert result.exit_code == 2
    assert "no privacy accountant 'gdp' installed (available: pld, prv, rdp)" in result.stderr


def invoke_with(plugins: list[object], *args: str) -> tuple[int, str, str]:
    pm = fresh_plugin_manager(autoload=True, plugins=plugins)
    result = CliRunner().invoke(cli, ["privacy", *args], obj={"pm": pm})
    return result.exit_code, result.stdout, result.stderr


def test_every_command_works_with_a_third_party_accountant() -> None:
    # linear-test charges q / sigma per step: 0.25 / 2 = 0.125.
    plugins: list[object] = [LinearAccountantPlugin()]
    common = ["--accountant", "linear-test", "-q", "0.25", "--delta", "1e-5", "--json"]
    code, out, err = invoke_with(plugins, "epsilon", *common, "-s", "2", "-t", "8")
    assert code == 0, err
    assert json.loads(out)["epsilon"] == 1.0
    code, out, err = invoke_with(plugins, "calibrate", *common, "-e", "3", "-t", "24")
    assert code == 0, err
    assert json.loads(out)["noise_multiplier"] == 2.0 and json.loads(out)["epsilon"] == 3.0
    code, out, err = invoke_with(plugins, "plan", *common, "-e", "3", "-s", "2")
    assert code == 0, err
    assert json.loads(out)["max_steps"] == 24 and json.loads(out)["epochs"] == 6.0
    code, out, err = invoke_with(plugins, "plan", *common, "-e", "3", "--epochs", "5")
    assert code == 0, err
    planned = json.loads(out)
    assert planned["steps"] == 20 and planned["noise_multiplier"] == pytest.approx(5 / 3)


def test_plan_takes_dataset_size_batch_size_and_epochs_as_opacus_does() -> None:
    code, out, err = invoke(
        "plan", "-e", "8", "-n", "60000", "-b", "256", "--epochs", "15", "--delta", "1e-5", "--json"
    )
    assert code == 0, err
    planned = json.loads(out)
    assert planned["steps"] == 15 * 60000 // 256 and planned["sampling_rate"] == 256 / 60000
    assert (planned["dataset_size"], planned["batch_size"]) == (60000, 256)
    expected = RdpAccountant().calibrate_noise_multiplier(8, 1e-5, 256 / 60000, planned["steps"])
    assert planned["noise_multiplier"] == expected and planned["epsilon"] <= 8

    code, out, _ = invoke("plan", "-e", "8", "-q", "0.1", "--epochs", "3", "--delta", "1e-5", "--json")
    assert code == 0 and json.loads(out)["steps"] == 30, "3 / 0.1 is 30 steps, not 29.999... rounded down"
    code, out, _ = invoke("plan", "-e", "8", "-n", "1000", "-b", "10", "-s", "1", "--delta", "1e-5")
    assert code == 0 and "q = 0.01" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-q", "0.1", "-n", "100", "-b", "10", "-s", "1"], "not both"),
        (["-n", "100", "-s", "1"], "--batch-size"),
        (["-n", "10", "-b", "100", "-s", "1"], "larger than --dataset-size"),
        (["-q", "0.1"], "--noise-multiplier"),
        (["-q", "0.1", "-s", "1", "--epochs", "2"], "not both"),
        (["-q", "0.1", "--epochs", "0.05"], "less than one step"),
    ],
)
def test_plan_refuses_ambiguous_or_impossible_requests(args: list[str], message: str) -> None:
    code, _, err = invoke("plan", "-e", "8", "--delta", "1e-5", *args)
    assert code == 2 and message in err


def test_an_accountant_that_raises_is_named_not_a_traceback() -> None:
    code, _, err = invoke_with(
        [BrokenAccountantPlugin()],
        "epsilon",
        "--accountant",
        "broken",
        "-q",
        "0.1",
        "-s",
        "1",
        "-t",
        "3",
        "--delta",
        "1e-5",
    )
    assert code == 2
    assert (
        "privacy accountant 'broken' from plugin" in err
        and "failed in get_epsilon: ValueError: no orders converged" in err
    )
