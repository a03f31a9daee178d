"""The orchestrator driving a real (third-party) backend, observed through hooks."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest

from tensafe.config import RunConfig, build_config
from tensafe.data import PoissonSampler, load_records, split_records
from tensafe.errors import NotInstalledError, PrivacyBudgetExceeded, StepVetoed, UsageError
from tensafe.orchestrator import TenSafeOrchestrator
from tensafe.plugins import PluginSettings, TensafePluginManager, create_plugin_manager
from tensafe.testing import fresh_plugin_manager
from tests.mocks.accountants import LinearAccountantPlugin
from tests.mocks.observers import RunObserver, StepVetoer
from tests.mocks.registrations import NamedRegistrar


def config_for(dataset: Path, tmp_path: Path, **sections: Any) -> RunConfig:
    data: dict[str, Any] = {
        "backend": "bigram",
        "output_dir": str(tmp_path / "runs"),
        "data": {"path": str(dataset)},
        "optimizer": {"learning_rate": 0.1},
        "training": {"steps": 6, "batch_size": 8},
        "dp": {"enabled": False},
    }
    data.update(sections)
    return build_config(data, environ={})


@pytest.fixture
def pm() -> TensafePluginManager:
    return fresh_plugin_manager(plugins=[LinearAccountantPlugin()], autoload=True)


def test_an_embedder_observes_a_whole_run(pm: TensafePluginManager, qa_dataset: Path, tmp_path: Path) -> None:
    observer = RunObserver()
    pm.register(observer)
    report = TenSafeOrchestrator(config_for(qa_dataset, tmp_path), plugin_manager=pm).run()
    assert report["status"] == "completed"
    kinds = [kind for kind, _ in observer.calls if kind != "audit"]
    assert kinds == ["start"] + ["approve", "report"] * 6 + ["finish"]
    assert [step for step, _ in observer.named("report")] == [1, 2, 3, 4, 5, 6]
    assert all("loss" in metrics and "batch_size" in metrics for _, metrics in observer.named("report"))
    audits = observer.named("audit")
    assert audits[0] == "run.start" and audits.count("train.step") == 6 and "artifact.write" in audits
    assert observer.named("finish") == ["completed"]


def test_a_non_private_run_learns_and_says_it_is_not_private(
    pm: TensafePluginManager, qa_dataset: Path, tmp_path: Path
) -> None:
    config = config_for(qa_dataset, tmp_path, training={"steps": 25, "batch_size": 8})
    report = TenSafeOrchestrator(config, plugin_manager=pm).run()
    loss = report["held_out_loss"]
    assert loss["after"] < 0.6 * loss["before"]
    assert report["privacy"] is None
    run_dir = Path(report["run_dir"])
    assert json.loads((run_dir / "report.json").read_text())["status"] == "completed"
    assert "privacy: NONE" in (run_dir / "report.txt").read_text()
    assert (run_dir / "adapter" / "bigram_adapter.json").is_file()
    assert len(report["samples"]) == 3


def test_a_vetoed_step_never_runs(pm: TensafePluginManager, qa_dataset: Path, tmp_path: Path) -> None:
    observer = RunObserver()
    pm.register(observer)
    pm.register(StepVetoer(first_refused=3))
    with pytest.raises(StepVetoed, match="step 3 was refused: maintenance window"):
        TenSafeOrchestrator(config_for(qa_dataset, tmp_path), plugin_manager=pm).run()
    assert [step for step, _ in observer.named("report")] == [1, 2]
    assert observer.named("finish") == ["failed"]


def dp_config(dataset: Path, tmp_path: Path, *, target_epsilon: float | None, sigma: float = 1.0) -> RunConfig:
    return config_for(
        dataset,
        tmp_path,
        dp={
            "enabled": True,
            "accountant": "linear-test",
            "noise_multiplier": sigma,
            "target_epsilon": target_epsilon,
            "max_grad_norm": 1.0,
            "secure_rng": False,
            "target_delta": 1e-3,
        },
    )


def test_the_step_that_would_exceed_the_budget_is_refused_and_does_nothing(
    pm: TensafePluginManager, qa_dataset: Path, tmp_path: Path
) -> None:
    # 36 training records, batch 8: q = 8/36 and the test accountant charges q / sigma per step.
    q = 8 / 36
    orchestrator = TenSafeOrchestrator(dp_config(qa_dataset, tmp_path, target_epsilon=3.5 * q), plugin_manager=pm)
    run = orchestrator.prepare()
    assert run.privacy is not None and run.privacy.sampling_rate == pytest.approx(q)
    for _ in range(3):
        assert orchestrator.train_step(run)["epsilon"] == pytest.approx(q * run.step)
    probe = run.eval_data[:2]
    before = run.backend.forward(probe, "cross_entropy").loss_fn_outputs
    with pytest.raises(PrivacyBudgetExceeded) as info:
        orchestrator.train_step(run)
    assert (info.value.steps, info.value.epsilon) == (3, pytest.approx(3 * q))
    assert info.value.delta == 1e-3 and info.value.exit_code == 3
    assert run.step == 3 and run.privacy.accountant.steps == 3
    assert run.backend.forward(probe, "cross_entropy").loss_fn_outputs == before


def test_noise_multiplier_is_calibrated_when_not_given(
    pm: TensafePluginManager, qa_dataset: Path, tmp_path: Path
) -> None:
    config = config_for(
        qa_dataset, tmp_path, dp={"accountant": "linear-test", "target_epsilon": 2.0, "target_delta": 1e-3}
    )
    orchestrator = TenSafeOrchestrator(config, plugin_manager=pm)
    run = orchestrator.prepare()
    # The test accountant calibrates sigma = steps * q / epsilon.
    assert run.config.dp.noise_multiplier == pytest.approx(6 * (8 / 36) / 2.0)


def test_default_delta_and_too_large_delta(pm: TensafePluginManager, qa_dataset: Path, tmp_path: Path) -> None:
    config = config_for(qa_dataset, tmp_path, dp={"accountant": "linear-test", "noise_multiplier": 1.0})
    run = TenSafeOrchestrator(config, plugin_manager=pm).prepare()
    assert run.privacy is not None and run.privacy.delta == pytest.approx(1 / 360)
    config = config_for(
        qa_dataset, tmp_path, dp={"accountant": "linear-test", "noise_multiplier": 1.0, "target_delta": 0.05}
    )
    with pytest.raises(UsageError, match="target_delta"):
        TenSafeOrchestrator(config, plugin_manager=pm).prepare()


def test_dp_on_a_backend_without_dp_sgd_is_refused(qa_dataset: Path, tmp_path: Path) -> None:
    from tensafe_bigram.backend import BigramBackend

    class NoDP(BigramBackend):
        capabilities = frozenset()

    pm = fresh_plugin_manager(plugins=[LinearAccountantPlugin()])
    pm.register(NamedRegistrar("tensafe_register_ml_backends", "bigram", NoDP), name="nodp")
    config = config_for(qa_dataset, tmp_path, dp={"accountant": "linear-test", "noise_multiplier": 1.0})
    with pytest.raises(UsageError, match="does not implement DP-SGD"):
        TenSafeOrchestrator(config, plugin_manager=pm).prepare()


def test_missing_accountant_says_what_to_install(qa_dataset: Path, tmp_path: Path) -> None:
    pm = create_plugin_manager(settings=PluginSettings(allowlist=frozenset({"bigram"}), strict=True))
    config = config_for(qa_dataset, tmp_path, dp={"accountant": "rdp", "noise_multiplier": 1.0})
    with pytest.raises(NotInstalledError, match="pip install ./tensafe-privacy"):
        TenSafeOrchestrator(config, plugin_manager=pm).prepare()


def test_generate_with_an_exported_adapter(pm: TensafePluginManager, qa_dataset: Path, tmp_path: Path) -> None:
    config = config_for(qa_dataset, tmp_path, training={"steps": 30, "batch_size": 8})
    report = TenSafeOrchestrator(config, plugin_manager=pm).run()
    adapter = Path(report["run_dir"]) / "adapter"
    orchestrator = TenSafeOrchestrator(config, plugin_manager=pm)
    tuned = orchestrator.generate(["item 3: colour?"], adapter=adapter)[0].sequences[0]
    base = orchestrator.generate(["item 3: colour?"])[0].sequences[0]
    assert tuned.tokens != base.tokens
    with pytest.raises(UsageError, match="adapter not found"):
        orchestrator.generate(["x"], adapter=tmp_path / "absent")


def test_poisson_sampling_includes_each_record_with_probability_q() -> None:
    sampler = PoissonSampler(200, 0.05, random.Random(7))
    sizes = [len(sampler.sample()) for _ in range(2000)]
    mean = sum(sizes) / len(sizes)
    # Binomial(200, 0.05): mean 10, std of the mean over 2000 draws about 0.07.
    assert abs(mean - 10) < 0.35
    assert min(sizes) < 5 < 15 < max(sizes), "batch sizes vary"
    counts = [0] * 200
    for _ in range(2000):
        for i in sampler.sample():
            counts[i] += 1
    assert all(40 < c < 170 for c in counts)


def test_dataset_errors_point_at_the_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine"}\n{"prompt": "p"}\n')
    with pytest.raises(UsageError, match=r"d.jsonl:2: expected"):
        load_records(path)
    path.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(UsageError, match=r"d.jsonl:2: not valid JSON"):
        load_records(path)
    with pytest.raises(UsageError, match="not found"):
        load_records(tmp_path / "none.jsonl")


def test_held_out_split_is_stable_and_disjoint(qa_dataset: Path) -> None:
    records = load_records(qa_dataset)
    train, held = split_records(records, 0.1)
    assert len(held) == 4 and len(train) == 36
    assert not set(map(id, train)) & set(map(id, held))
    assert split_records(records, 0.1) == (train, held)


def test_budget_warning_is_reported_once_when_the_threshold_is_crossed(
    pm: TensafePluginManager, qa_dataset: Path, tmp_path: Path
) -> None:
    q = 8 / 36
    observer = RunObserver()
    pm.register(observer)
    config = dp_config(qa_dataset, tmp_path, target_epsilon=10 * q)  # 6 steps spend 6q; warn at 8q is not reached
    config.dp.warn_fraction = 0.5  # 5q is crossed at step 5
    TenSafeOrchestrator(config, plugin_manager=pm).run()
    [(epsilon, target)] = observer.named("warn")
    assert epsilon == pytest.approx(5 * q) and target == pytest.approx(10 * q)
    kinds = [kind for kind, _ in observer.calls if kind in ("report", "warn")]
    assert kinds.index("warn") == 5, "the warning follows the report of step 5"


def test_report_shows_epsilon_by_step(pm: TensafePluginManager, qa_dataset: Path, tmp_path: Path) -> None:
    report = TenSafeOrchestrator(dp_config(qa_dataset, tmp_path, target_epsilon=None), plugin_manager=pm).run()
    text = (Path(report["run_dir"]) / "report.txt").read_text()
    assert "epsilon by step: 1: 0.222, 2: 0.444" in text and "6: 1.333" in text
    assert report["privacy"]["randomness"].startswith("seeded")


def test_interrupted_run_resumes_exactly_where_it_stopped(
    pm: TensafePluginManager, qa_dataset: Path, tmp_path: Path
) -> None:
    # Without DP nothing is random but the seeded batch sampling, which the checkpoint carries: exact resume.
    config = config_for(qa_dataset, tmp_path, training={"steps": 8, "batch_size": 8, "checkpoint_every": 1})
    straight = TenSafeOrchestrator(config, plugin_manager=pm).run(run_dir=tmp_path / "straight")

    vetoer = StepVetoer(first_refused=6)
    pm.register(vetoer)
    with pytest.raises(StepVetoed):
        TenSafeOrchestrator(config, plugin_manager=pm).run(run_dir=tmp_path / "resumed")
    pm.unregister(vetoer)
    saved = json.loads((tmp_path / "resumed" / "checkpoint" / "progress.json").read_text())
    assert saved["step"] == 5

    resumed = TenSafeOrchestrator(config, plugin_manager=pm).run(run_dir=tmp_path / "resumed", resume=True)
    assert resumed["steps"] == 8
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]
    assert (tmp_path / "resumed" / "adapter" / "bigram_adapter.json").read_text() == (
        tmp_path / "straight" / "adapter" / "bigram_adapter.json"
    ).read_text()


def test_a_resumed_dp_run_keeps_its_spend_and_draws_fresh_noise(
    pm: TensafePluginManager, qa_dataset: Path, tmp_path: Path
) -> None:
    config = dp_config(qa_dataset, tmp_path, target_epsilon=None)
    config.dp.secure_rng = True
    config.training.steps = 8
    vetoer = StepVetoer(first_refused=6)
    pm.register(vetoer)
    with pytest.raises(StepVetoed):
        TenSafeOrchestrator(config, plugin_manager=pm).run(run_dir=tmp_path / "r")
    pm.unregister(vetoer)
    saved = json.loads((tmp_path / "r" / "checkpoint" / "progress.json").read_text())
    assert saved["step"] == 5 and saved["privacy"]["accountant_state"]["steps"] == 5
    assert saved["rng"] is None, "batch sampling under DP uses the OS CSPRNG, which has no state to save"
    adapters = []
    for name in ("a", "b"):
        shutil.copytree(tmp_path / "r", tmp_path / name)
        report = TenSafeOrchestrator(config, plugin_manager=pm).run(run_dir=tmp_path / name, resume=True)
        assert report["steps"] == 8 and report["privacy"]["steps"] == 8
        assert [h["epsilon"] for h in report["history"]] == pytest.approx([(8 / 36) * s for s in range(1, 9)])
        adapters.append((tmp_path / name / "adapter" / "bigram_adapter.json").read_text())
    assert adapters[0] != adapters[1], "two resumes of one checkpoint must not draw the same noise"


def test_resume_refuses_a_checkpoint_with_other_privacy_parameters(
    pm: TensafePluginManager, qa_dataset: Path, tmp_path: Path
) -> None:
    config = dp_config(qa_dataset, tmp_path, target_epsilon=None)
    TenSafeOrchestrator(config, plugin_manager=pm).run(run_dir=tmp_path / "r")
    other = dp_config(qa_dataset, tmp_path, target_epsilon=None, sigma=2.0)
    other.training.steps = 9
    with pytest.raises(UsageError, match="checkpoint was made with"):
        TenSafeOrchestrator(other, plugin_manager=pm).run(run_dir=tmp_path / "r", resume=True)
    with pytest.raises(UsageError, match="already holds a run"):
        TenSafeOrchestrator(config, plugin_manager=pm).run(run_dir=tmp_path / "r")


def test_a_torn_checkpoint_is_refused(pm: TensafePluginManager, qa_dataset: Path, tmp_path: Path) -> None:
    config = dp_config(qa_dataset, tmp_path, target_epsilon=None)
    TenSafeOrchestrator(config, plugin_manager=pm).run(run_dir=tmp_path / "r")
    progress = tmp_path / "r" / "checkpoint" / "progress.json"
    data = json.loads(progress.read_text())
    data["privacy"]["accountant_state"]["steps"] = 2  # spend that lags the weights must never be accepted
    progress.write_text(json.dumps(data))
    config.training.steps = 9
    with pytest.raises(UsageError, match="torn"):
        TenSafeOrchestrator(config, plugin_manager=pm).run(run_dir=tmp_path / "r", resume=True)
