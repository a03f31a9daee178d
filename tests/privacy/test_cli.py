"""tensafe privacy epsilon | calibrate | plan."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from tensafe.cli.main import cli
from tensafe.testing import fresh_plugin_manager
from tensafe_privacy.accountants import PldAccountant, RdpAccountant


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
