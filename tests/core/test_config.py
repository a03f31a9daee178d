"""Run configuration: formats, field-level errors, environment overrides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tensafe.config import RunConfig, build_config, env_overrides, load_config
from tensafe.errors import ConfigError
from tests.core.test_plugins import run_cli


def test_defaults_follow_tinker_and_are_private() -> None:
    config = RunConfig()
    assert config.backend == "torch"
    assert config.dp.enabled and config.dp.target_epsilon is not None
    assert (config.optimizer.beta1, config.optimizer.beta2, config.optimizer.eps) == (0.9, 0.95, 1e-12)


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("run.yaml", "backend: bigram\ndp:\n  noise_multiplier: 1.3\ntraining:\n  steps: 7\n"),
        ("run.toml", 'backend = "bigram"\n[dp]\nnoise_multiplier = 1.3\n[training]\nsteps = 7\n'),
        ("run.json", json.dumps({"backend": "bigram", "dp": {"noise_multiplier": 1.3}, "training": {"steps": 7}})),
    ],
)
def test_each_format_loads_the_same_config(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    config = load_config(path, environ={})
    assert (config.backend, config.dp.noise_multiplier, config.training.steps) == ("bigram", 1.3, 7)


def test_errors_name_every_bad_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("dp:\n  max_grad_norm: -1\n  epsilon: 3\nlora:\n  rank: zero\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    fields = [loc for loc, _ in info.value.problems]
    assert sorted(fields) == ["dp.epsilon", "dp.max_grad_norm", "lora.rank"]
    assert info.value.exit_code == 2


def test_dp_needs_a_budget_or_a_noise_multiplier() -> None:
    with pytest.raises(ConfigError, match="set target_epsilon, noise_multiplier, or both"):
        build_config({"dp": {"target_epsilon": None}}, environ={})


@pytest.mark.parametrize(("text", "message"), [("- a\n- b\n", "must be a mapping"), ("a: [", "cannot parse")])
def test_unparseable_files_are_config_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path, environ={})


def test_unknown_suffix_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "c.ini").write_text("x")
    with pytest.raises(ConfigError, match="unknown config format"):
        load_config(tmp_path / "c.ini")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")


def test_environment_overrides_nested_fields(tmp_path: Path) -> None:
    environ = {
        "TENSAFE_CONFIG__DP__NOISE_MULTIPLIER": "2.5",
        "TENSAFE_CONFIG__BACKEND": "bigram",
        "TENSAFE_CONFIG__LORA__TARGET_MODULES": '["q_proj", "v_proj"]',
        "UNRELATED": "1",
    }
    assert env_overrides(environ) == {
        "dp": {"noise_multiplier": 2.5},
        "backend": "bigram",
        "lora": {"target_modules": ["q_proj", "v_proj"]},
    }
    path = tmp_path / "run.yaml"
    path.write_text("dp:\n  noise_multiplier: 1.0\n  max_grad_norm: 0.5\n")
    config = load_config(path, environ=environ)
    assert (config.dp.noise_multiplier, config.dp.max_grad_norm, config.backend) == (2.5, 0.5, "bigram")


def test_bad_environment_override_names_the_field() -> None:
    with pytest.raises(ConfigError, match="training.steps"):
        load_config(None, environ={"TENSAFE_CONFIG__TRAINING__STEPS": "many"})


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "run.yaml"
    path.write_text("data:\n  path: data.jsonl\noutput_dir: out\n")
    config = load_config(path, environ={})
    assert config.data.path == tmp_path / "sub" / "data.jsonl"
    assert config.output_dir == tmp_path / "sub" / "out"


# -- tensafe config validate | show --------------------------------------------------------------------------


def test_show_prints_each_fields_description_and_default(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("dp:\n  target_delta: 1.0e-6\n")
    result = run_cli("config", "show", str(path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    at = lines.index("  target_delta: 1.0e-06")
    assert lines[at - 1] == "  # delta of (epsilon, delta)-DP; None = 1 / (10 * dataset size). (default: null)"
    assert "  # Optimizer steps to take. (default: 300)" in lines
    assert "# Set to run inference with the adapter under HE. (default: null)" in lines
    assert "#     poly_modulus_degree: 8192" in lines, "an unset section shows its settings, commented out"
    as_json = run_cli("config", "show", str(path), "--format", "json")
    assert yaml.safe_load(result.stdout) == json.loads(as_json.stdout), "the comments leave the YAML's values alone"


def test_a_relative_model_path_resolves_next_to_the_config_file_and_a_hub_id_stays(tmp_path: Path) -> None:
    from tensafe.config import load_config

    (tmp_path / "models" / "mine").mkdir(parents=True)
    config = tmp_path / "run.yaml"
    config.write_text("model: {path: models/mine}\n")
    assert load_config(config).model.path == str(tmp_path / "models" / "mine")
    config.write_text("model: {path: acme/llama-7b}\n")
    assert load_config(config).model.path == "acme/llama-7b"


# -- every number is finite and in range ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "field"),
    [
        ("TENSAFE_CONFIG__OPTIMIZER__LEARNING_RATE", "inf", "optimizer.learning_rate"),
        ("TENSAFE_CONFIG__OPTIMIZER__LEARNING_RATE", "NaN", "optimizer.learning_rate"),
        ("TENSAFE_CONFIG__DP__MAX_GRAD_NORM", "Infinity", "dp.max_grad_norm"),
        ("TENSAFE_CONFIG__DP__TARGET_EPSILON", "inf", "dp.target_epsilon"),
        ("TENSAFE_CONFIG__SAMPLING__TEMPERATURE", "1e-300", "sampling.temperature"),
        ("TENSAFE_CONFIG__TRAINING__SEED", str(2**64), "training.seed"),
        ("TENSAFE_CONFIG__MODEL__DEVICE", "tpu:%n%s", "model.device"),
    ],
)
def test_an_infinite_or_out_of_range_override_is_a_field_error(variable: str, value: str, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, environ={variable: value})
    assert [loc for loc, _ in info.value.problems] == [field]


def test_an_infinite_learning_rate_through_the_cli_is_a_field_error_with_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("backend: bigram\n")
    result = run_cli("config", "validate", str(path), env={"TENSAFE_CONFIG__OPTIMIZER__LEARNING_RATE": "inf"})
    assert result.returncode == 2, result.stderr
    assert "optimizer.learning_rate" in result.stderr and "finite" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps"])
def test_each_device_form_is_accepted(device: str) -> None:
    assert build_config({"model": {"device": device}}, environ={}).model.device == device


def test_every_float_field_refuses_infinity() -> None:
    config = RunConfig(mode="rlvr", he={}, tgsp={})  # every section present
    sections = {name: getattr(config, name) for name in type(config).model_fields}
    checked = []
    for section_name, section in sections.items():
        if not hasattr(type(section), "model_fields"):
            continue
        for field_name, field in type(section).model_fields.items():
            if "float" not in str(field.annotation):
                continue
            with pytest.raises(ConfigError, match=f"{section_name}.{field_name}"):
                build_config(
                    {**({"mode": "rlvr"} if section_name == "rl" else {}), section_name: {field_name: "inf"}},
                    environ={},
                )
            checked.append(f"{section_name}.{field_name}")
    assert "optimizer.learning_rate" in checked and "dp.max_grad_norm" in checked and "rl.temperature" in checked
