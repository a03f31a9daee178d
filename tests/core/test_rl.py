"""RLVR in core: rewards, advantages, the loop on a real (third-party) backend, DP accounting, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from tensafe.config import RewardTerm, RunConfig, build_config
from tensafe.data import Record
from tensafe.errors import BackendError, ConfigError, StepVetoed, UsageError
from tensafe.orchestrator import TenSafeOrchestrator
from tensafe.plugins import TensafePluginManager
from tensafe.rl.privacy import backend_config
from tensafe.rl.rewards import ExactMatch, NumericMatch, RegexMatch, resolve_rewards, resolve_term, score
from tensafe.rl.rollouts import Rollout, RolloutBatch, assign_advantages, collect_rollouts, policy_datum
from tensafe.testing import fresh_plugin_manager
from tensafe.types import SamplingParams
from tensafe_bigram.backend import BigramBackend
from tests.mocks.accountants import LinearAccountantPlugin
from tests.mocks.observers import StepVetoer
from tests.mocks.rewards import AuditRecorder

TIMING = ("sample_seconds", "update_seconds")


@pytest.fixture
def pm() -> TensafePluginManager:
    return fresh_plugin_manager(plugins=[LinearAccountantPlugin()], autoload=True)


def rl_config(dataset: Path, tmp_path: Path, rl: dict[str, Any] | None = None, **sections: Any) -> RunConfig:
    data: dict[str, Any] = {
        "mode": "rlvr",
        "backend": "bigram",
        "output_dir": str(tmp_path / "runs"),
        "data": {"path": str(dataset)},
        "optimizer": {"learning_rate": 0.1},
        "training": {"steps": 4, "batch_size": 4, "checkpoint_every": 0},
        "dp": {"enabled": False},
        "rl": {"group_size": 3, "max_tokens": 4, "eval_prompts": 4, **(rl or {})},
    }
    data.update(sections)
    return build_config(data, environ={})


# -- rewards ------------------------------------------------------------------


def test_exact_match_compares_the_answer_line() -> None:
    exact = ExactMatch()
    assert exact("q", " Seville.\nRecord 12", " Seville") == 1.0
    assert exact("q", " Sevilla.", " Seville") == 0.0
    assert ExactMatch(ignore_case=True)("q", " seville", "Seville") == 1.0
    assert ExactMatch(prefix=True)("q", " Seville Spain", "Seville") == 1.0
    assert ExactMatch(answer_pattern=r"answer: (\w+)")("q", "so the answer: 42 ok", "42") == 1.0
    assert ExactMatch(answer_pattern=r"answer: (\w+)")("q", "no idea", "42") == 0.0


def test_numeric_match_within_tolerance() -> None:
    assert NumericMatch(tolerance=0.01)("q", "it is 3.141", "3.14") == 1.0
    assert NumericMatch(tolerance=0.0001)("q", "it is 3.141", "3.14") == 0.0
    assert NumericMatch(tolerance=0.1, relative=True)("q", "-105", "-100") == 1.0
    assert NumericMatch()("q", "no number", "7") == 0.0
    with pytest.raises(ValueError, match="holds no number"):
        NumericMatch()("q", "7", "seven")


def test_regex_format_check() -> None:
    assert RegexMatch(pattern=r"\(\w\w\)\.$")("q", " Spain (ES).", None) == 1.0
    assert RegexMatch(pattern=r"[A-Z][a-z]+", full=True)("q", " Spain (ES).", None) == 0.0


def test_rewards_resolve_by_name_and_dotted_path_and_combine(pm: TensafePluginManager) -> None:
    terms = [
        RewardTerm(name="exact_match"),
        RewardTerm(name="regex", weight=0.5, options={"pattern": r"\.$"}),
        RewardTerm(name="tests.mocks.rewards:constant_one", weight=0.25),
        RewardTerm(name="tests.mocks.rewards.ScaledReward", weight=2.0, options={"scale": 0.0}),
    ]
    reward = resolve_rewards(pm.registry, terms)
    assert reward("q", " Paris.", "Paris") == pytest.approx(1.75)
    assert reward("q", " Rome", "Paris") == pytest.approx(0.25)
    assert {"exact_match", "numeric", "regex"} <= set(pm.registry.names("reward"))


@pytest.mark.parametrize(
    ("term", "message"),
    [
        (RewardTerm(name="nope"), r"no reward function 'nope' is registered \(available: exact_match, numeric"),
        (RewardTerm(name="tests.mocks.rewards:missing"), "cannot be imported"),
        (RewardTerm(name="no_such_module.reward"), "cannot be imported"),
        (RewardTerm(name="numeric", options={"tolerence": 1}), "rejected its options"),
        (RewardTerm(name="regex", options={"pattern": "("}), "not a valid regular expression"),
        (RewardTerm(name="tests.mocks.rewards:constant_one", options={"x": 1}), "options need a class"),
        (RewardTerm(name="tests.mocks.rewards:__name__"), "not callable as a reward function"),
    ],
)
def test_bad_reward_terms_are_config_errors(pm: TensafePluginManager, term: RewardTerm, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_term(pm.registry, term)


def test_score_turns_failures_into_reasons() -> None:
    def broken(prompt: str, completion: str, reference: str | None) -> float:
        raise KeyError("x")

    assert score(broken, "p", "c", None) == "KeyError: 'x'"
    assert score(lambda p, c, r: math.inf, "p", "c", None) == "reward is inf"
    assert score(lambda p, c, r: 0.5, "p", "c", None) == 0.5


# -- advantages and data --------------------------------------------------------


def group(rewards: list[float | None], record: int = 0) -> list[Rollout]:
    return [Rollout(record, [1, 2], [3], [-0.5], "x", r, None if r is not None else "err") for r in rewards]


def test_group_baseline_and_normalisation_use_only_the_records_own_rollouts() -> None:
    batch = RolloutBatch([group([1.0, 0.0, 0.0, None]), group([5.0, 5.0], record=1)])
    assign_advantages(batch, "group", normalize=False, running=None)
    assert [r.advantage for r in batch.groups[0]] == pytest.approx([2 / 3, -1 / 3, -1 / 3, 0.0])
    assert [r.advantage for r in batch.groups[1]] == [0.0, 0.0]
    assign_advantages(batch, "group", normalize=True, running=None)
    std = math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)
    assert batch.groups[0][0].advantage == pytest.approx((2 / 3) / std, rel=1e-5)
    assign_advantages(batch, "running", normalize=False, running=0.25)
    assert batch.groups[0][1].advantage == pytest.approx(-0.25)
    assign_advantages(batch, "none", normalize=False, running=None)
    assert batch.groups[1][0].advantage == 5.0


def test_policy_datum_puts_sampler_logprobs_and_advantages_on_the_sampled_tokens() -> None:
    rollout = Rollout(0, [10, 11, 12], [20, 21], [-1.5, -0.25], "ab", 1.0, advantage=0.75)
    datum = policy_datum(rollout)
    assert datum.model_input == [10, 11, 12, 20]
    assert datum.target_tokens == [11, 12, 20, 21]
    assert datum.values("weights") == [0.0, 0.0, 1.0, 1.0]
    assert datum.values("logprobs")[2:] == [-1.5, -0.25]
    assert datum.values("advantages") == [0.0, 0.0, 0.75, 0.75]


# -- config ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"rl": {}}, "rl settings are only used with mode: rlvr"),
        ({"mode": "rlvr", "rl": {"epochs": 2}}, "epochs > 1 needs algorithm: ppo"),
        ({"mode": "rlvr", "rl": {"group_size": 1}}, "group_size >= 2"),
        ({"mode": "rlvr", "training": {"steps": 5}, "rl": {"algorithm": "ppo", "epochs": 2}}, "multiple of rl.epochs"),
        ({"mode": "rlvr", "rl": {"baseline": "running"}}, "mixes rewards of different records"),
        ({"mode": "rlvr", "rl": {"rewards": []}}, "rl.rewards"),
        ({"mode": "rl"}, "mode"),
    ],
)
def test_rl_config_errors_name_the_problem(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config(data, environ={})


def test_rlvr_mode_gets_default_rl_settings() -> None:
    config = build_config({"mode": "rlvr"}, environ={})
    assert config.rl is not None and config.rl.rewards[0].name == "exact_match"


# -- the loop -------------------------------------------------------------------


def test_an_unresolvable_reward_fails_before_anything_is_sampled(
    pm: TensafePluginManager, qa_dataset: Path, tmp_path: Path
) -> None:
    config = rl_config(qa_dataset, tmp_path, rl={"rewards": [{"name": "exact_matsch"}]})
    with pytest.raises(ConfigError, match="no reward function 'exact_matsch'"):
        TenSafeOrchestrator(config, plugin_manager=pm).run()
    assert not (tmp_path / "runs").exists()


def test_an_rlvr_run_reports_rewards_and_a_curve(pm: TensafePluginManager, qa_dataset: Path, tmp_path: Path) -> None:
    config = rl_config(
        qa_dataset,
        tmp_path,
        rl={"rewards": [{"name": "tests.mocks.rewards.ScaledReward"}]},
        training={"steps": 4, "batch_size": 4, "eval_every": 2},
    )
    report = TenSafeOrchestrator(config, plugin_manager=pm).run()
    assert report["status"] == "completed" and report["mode"] == "rlvr" and report["steps"] == 4
    assert set(report["held_out_reward"]) == {"before", "after"}
    assert [h["step"] for h in report["history"] if "held_out_reward" in h] == [2.0, 4.0]
    for entry in report["history"]:
        assert entry["rollouts"] == 3 * entry["batch_size"]
        assert 0.0 <= entry["reward"] <= 1.0 or (entry["batch_size"] == 0 and math.isnan(entry["reward"]))
    text = (Path(report["run_dir"]) / "report.txt").read_text()
    assert "held-out reward:" in text and "held-out reward by step: 2:" in text and "rollout reward by step" in text


def test_a_failing_reward_excludes_only_that_rollout(
    pm: TensafePluginManager, qa_dataset: Path, tmp_path: Path
) -> None:
    recorder = AuditRecorder()
    pm.register(recorder)
    config = rl_config(
        qa_dataset,
        tmp_path,
        rl={"rewards": [{"name": "tests.mocks.rewards.FlakyReward"}], "eval_prompts": 0},
        training={"steps": 2, "batch_size": 6, "seed": 3},
    )
    report = TenSafeOrchestrator(config, plugin_manager=pm).run()
    assert report["status"] == "completed"
    first = next(h for h in report["history"] if h["rollouts"] > 0)
    assert first["excluded_rollouts"] == 2 and first["reward"] == 1.0
    excluded = [e.details for e in recorder.events if e.operation == "rl.rollouts_excluded"]
    # The audit log counts excluded rollouts; it never names the record or repeats the reward's error text.
    assert [e["count"] for e in excluded] == [2]
    assert not any("record" in e or "error" in e for e in excluded)


def test_a_vetoed_rl_step_draws_nothing_and_samples_nothing(
    pm: TensafePluginManager, qa_dataset: Path, tmp_path: Path
) -> None:
    pm.register(StepVetoer(first_refused=2))
    orchestrator = TenSafeOrchestrator(rl_config(qa_dataset, tmp_path), plugin_manager=pm)
    run = orchestrator.prepare()
    orchestrator.train_step(run)
    state = run.backend.save_state()
    with pytest.raises(StepVetoed):
        orchestrator.train_step(run)
    assert run.rl is not None and run.rl.iterations == 1 and run.backend.save_state() == state


def without_timing(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in h.items() if k not in TIMING} for h in history]


def test_a_resumed_rl_run_continues_identically(pm: TensafePluginManager, qa_dataset: Path, tmp_path: Path) -> None:
    def config(steps: int, name: str) -> RunConfig:
        return rl_config(
            qa_dataset,
            tmp_path,
            rl={"baseline": "running", "group_size": 2},
            run_name=name,
            training={"steps": steps, "batch_size": 4, "seed": 11},
        )

    straight = TenSafeOrchestrator(config(6, "straight"), plugin_manager=pm).run(evaluate=False)
    TenSafeOrchestrator(config(3, "resumed"), plugin_manager=pm).run(evaluate=False)
    resumed = TenSafeOrchestrator(config(6, "resumed"), plugin_manager=pm).run(
        evaluate=False, run_dir=tmp_path / "runs" / "resumed", resume=True
    )
    assert without_timing(resumed["history"]) == without_timing(straight["history"])
    progress = [
        json.loads((tmp_path / "runs" / n / "checkpoint" / "progress.json").read_text())
        for n in ("straight", "resumed")
    ]
    assert progress[0]["rl"] == progress[1]["rl"] and progress[0]["rl"]["iterations"] == 6
    assert progress[0]["rl"]["running_baseline"] is not None
    adapters = [
        (tmp_path / "runs" / n / "adapter" / "bigram_adapter.json").read_text() for n in ("straight", "resumed")
    ]
    assert adapters[0] == adapters[1]


def test_resuming_with_other_rl_settings_is_refused(pm: TensafePluginManager, qa_dataset: Path, tmp_path: Path) -> None:
    TenSafeOrchestrator(rl_config(qa_dataset, tmp_path, run_name="r"), plugin_manager=pm).run(evaluate=False)
    other = rl_config(qa_dataset, tmp_path, rl={"group_size": 4}, run_name="r", training={"steps": 6})
    with pytest.raises(UsageError, match="other rl settings"):
        TenSafeOrchestrator(other, plugin_manager=pm).run(run_dir=tmp_path / "runs" / "r", resume=True)


# -- DP-RLVR accounting ---------------------------------------------------------


def dp_rl(dataset: Path, tmp_path: Path, **dp: Any) -> RunConfig:
    return rl_config(
        dataset,
        tmp_path,
        rl={"algorithm": "ppo", "epochs": 2, "group_size": 4},
        training={"steps": 6, "batch_size": 4},
        dp={"enabled": True, "accountant": "linear-test", "secure_rng": False, "target_delta": 1e-3, **dp},
    )


def test_dp_rlvr_clips_each_rollout_to_its_share_and_charges_one_mechanism_per_sample(
    pm: TensafePluginManager, qa_dataset: Path, tmp_path: Path
) -> None:
    sigma, clip, group_size, epochs = 2.0, 0.5, 4, 2
    config = dp_rl(qa_dataset, tmp_path, noise_multiplier=sigma, max_grad_norm=clip, target_epsilon=None)
    orchestrator = TenSafeOrchestrator(config, plugin_manager=pm)
    run = orchestrator.prepare()
    trained = backend_config(run.config).dp
    # One record's G rollouts, each clipped to C/G, move the sum by at most C; the noise std stays sigma*C.
    assert group_size * trained.max_grad_norm == pytest.approx(clip)
    assert trained.noise_multiplier * trained.max_grad_norm == pytest.approx(sigma * clip)
    noise_to_record_sensitivity = (
        trained.noise_multiplier * trained.max_grad_norm / (group_size * trained.max_grad_norm)
    )
    ledger = run.privacy
    assert ledger is not None
    # Two updates on one sample cost what one update at sigma / sqrt(2) costs.
    assert ledger.noise_multiplier == pytest.approx(noise_to_record_sensitivity / math.sqrt(epochs))
    report = orchestrator.run(prepared=run, evaluate=False)
    q = 4 / 36
    assert report["steps"] == 6 and report["privacy"]["steps"] == 3
    assert report["privacy"]["epsilon"] == pytest.approx(3 * q / (sigma / math.sqrt(epochs)))
    certificate = report["privacy"]
    assert certificate["rollouts_per_record"] == 4 and certificate["updates_per_sample"] == 2
    assert certificate["per_rollout_clip"] == pytest.approx(clip / 4)
    assert certificate["noise_multiplier_per_update"] == sigma


def test_dp_rlvr_calibrates_the_per_update_noise_for_the_budget(
    pm: TensafePluginManager, qa_dataset: Path, tmp_path: Path
) -> None:
    config = dp_rl(qa_dataset, tmp_path, target_epsilon=2.0)
    run = TenSafeOrchestrator(config, plugin_manager=pm).prepare()
    # The test accountant calibrates sigma = charges * q / epsilon; 6 steps in PPO pairs are 3 charges.
    charged = 3 * (4 / 36) / 2.0
    assert run.privacy is not None and run.privacy.noise_multiplier == pytest.approx(charged)
    assert run.config.dp.noise_multiplier == pytest.approx(charged * math.sqrt(2))


def test_a_dp_rlvr_checkpoint_resumes_with_its_spend(
    pm: TensafePluginManager, qa_dataset: Path, tmp_path: Path
) -> None:
    config = dp_rl(qa_dataset, tmp_path, noise_multiplier=1.0, target_epsilon=None)
    first = TenSafeOrchestrator(config.model_copy(update={"run_name": "dp"}), plugin_manager=pm).run(evaluate=False)
    longer = config.model_copy(update={"run_name": "dp", "training": config.training.model_copy(update={"steps": 10})})
    again = TenSafeOrchestrator(longer, plugin_manager=pm).run(
        evaluate=False, run_dir=Path(first["run_dir"]), resume=True
    )
    assert again["steps"] == 10 and again["privacy"]["steps"] == 5


# -- per-record rollouts --------------------------------------------------------


def _rollouts(pm: TensafePluginManager, qa_dataset: Path, tmp_path: Path, indices: list[int]) -> list[list[str]]:
    orchestrator = TenSafeOrchestrator(rl_config(qa_dataset, tmp_path, training={"seed": 5}), plugin_manager=pm)
    run = orchestrator.prepare()
    assert run.rl is not None
    sampling = run.rl.sampling()  # type: ignore[attr-defined]
    seeds = run.rl._seeds(run)  # type: ignore[attr-defined]
    batch = collect_rollouts(run.backend, run.train_records, indices, run.rl.reward, sampling, 3, seeds)  # type: ignore[attr-defined]
    return [[r.text for r in group] for group in batch.groups]


def test_a_records_rollouts_do_not_depend_on_the_rest_of_the_batch(
    pm: TensafePluginManager, qa_dataset: Path, tmp_path: Path
) -> None:
    alone = _rollouts(pm, qa_dataset, tmp_path, [7])
    with_others = _rollouts(pm, qa_dataset, tmp_path, [1, 2, 7, 30])
    assert with_others[2] == alone[0]
    assert len({tuple(g) for g in with_others}) > 1


def test_dp_rollout_seeds_are_secret(pm: TensafePluginManager, qa_dataset: Path, tmp_path: Path) -> None:
    config = rl_config(
        qa_dataset, tmp_path, dp={"accountant": "linear-test", "noise_multiplier": 1.0, "target_epsilon": None}
    )
    run = TenSafeOrchestrator(config, plugin_manager=pm).prepare()
    seeds = run.rl._seeds(run)  # type: ignore[union-attr]
    assert seeds(3) != seeds(3), "under DP with secure_rng each draw is fresh CSPRNG output"


class ExtraSequences(BigramBackend):
    """Returns one sequence more per prompt than asked for."""

    def sample(self, prompts: Any, sampling_params: Any, num_samples: int = 1) -> Any:
        return super().sample(prompts, sampling_params, num_samples + 1)


def test_a_backend_returning_more_than_group_size_sequences_is_refused(qa_dataset: Path) -> None:
    backend = ExtraSequences()
    backend.initialize_model(build_config({"backend": "bigram", "dp": {"enabled": False}}, environ={}))
    records = [Record("item 1: colour?", " red")]
    with pytest.raises(BackendError, match="returned 4 sequences for one prompt where 3 were asked for"):
        collect_rollouts(backend, records, [0], ExactMatch(), SamplingParams(max_tokens=3), 3, lambda _: 1)
