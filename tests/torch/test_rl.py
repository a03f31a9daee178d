"""RLVR on the torch backend: update direction, zero advantages, PPO clipping, per-record DP sensitivity."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from tensafe.config import RunConfig, build_config
from tensafe.data import Record
from tensafe.orchestrator import TenSafeOrchestrator
from tensafe.rl.loop import RLVRLoop
from tensafe.rl.privacy import backend_config
from tensafe.rl.rollouts import RolloutBatch, assign_advantages, collect_rollouts, policy_data
from tensafe.testing import fresh_plugin_manager
from tensafe.types import SamplingParams
from tensafe_torch import assets
from tensafe_torch.backend import TorchBackend
from tests.mocks.rewards import ScaledReward, constant_one
from tests.torch.test_backend import grads, warmed
from tests.torch.test_dp import perturb_lora_b

RECORDS = [
    Record("Record 5305. Name: Elena Costa. Born: 1946. Country: Spain. City:", " Madrid|Seville|Valencia"),
    Record("Record 1186. Name: Rosa Tanaka. Born: 1947. Country: Canada. City:", " Calgary|Montreal|Toronto"),
]
SAMPLING = SamplingParams(max_tokens=4, temperature=1.0, seed=5)


def seed_for(index: int) -> int:
    """Each record's rollouts seeded on their own (as the RL loop does), reproducibly for the test."""
    return 1000 + index


def rollouts(backend: TorchBackend, reward: object, group_size: int = 4) -> RolloutBatch:
    return collect_rollouts(backend, RECORDS, [0, 1], reward, SAMPLING, group_size, seed_for)  # type: ignore[arg-type]


def test_flipping_the_sign_of_every_reward_flips_the_update() -> None:
    up, down = warmed(), warmed()
    batches = [rollouts(up, ScaledReward(1.0)), rollouts(down, ScaledReward(-1.0))]
    assert [r.text for r in batches[0].rollouts] == [r.text for r in batches[1].rollouts]
    for backend, batch in zip((up, down), batches, strict=True):
        assign_advantages(batch, "group", normalize=False, running=None)
        backend.forward_backward(policy_data(batch), "importance_sampling")
    assert float(grads(up).norm()) > 0
    torch.testing.assert_close(grads(up), -grads(down))


@pytest.mark.parametrize("loss", ["importance_sampling", "ppo"])
def test_equal_rewards_in_every_group_give_zero_policy_gradient(loss: str) -> None:
    backend = warmed()
    batch = rollouts(backend, constant_one)
    assign_advantages(batch, "group", normalize=True, running=None)
    assert all(r.advantage == 0.0 for r in batch.rollouts)
    backend.forward_backward(policy_data(batch), loss)  # type: ignore[arg-type]
    assert float(grads(backend).abs().max()) == 0.0


def loop_config(clip: tuple[float, float]) -> RunConfig:
    return build_config(
        {
            "mode": "rlvr",
            "dp": {"enabled": False},
            "training": {"steps": 2, "batch_size": 2, "seed": 0},
            "lora": {"rank": 4, "seed": 0},
            "optimizer": {"learning_rate": 0.002},
            "rl": {
                "algorithm": "ppo",
                "epochs": 2,
                "group_size": 4,
                "max_tokens": 4,
                "clip_low": clip[0],
                "clip_high": clip[1],
                "rewards": [{"name": "tests.mocks.rewards.ScaledReward"}],
            },
        },
        environ={},
    )


@pytest.mark.parametrize(("clip", "clipped"), [((1.0, 1.0), True), ((1e-6, 1e6), False)])
def test_ppo_epochs_clip_the_ratio_at_the_configured_bounds(clip: tuple[float, float], clipped: bool) -> None:
    config = loop_config(clip)
    orchestrator = TenSafeOrchestrator(config, plugin_manager=fresh_plugin_manager(autoload=True))
    run = orchestrator.prepare()
    perturb_lora_b(run.backend)  # type: ignore[arg-type]
    run.data = dataclasses.replace(run.data, train=RECORDS * 2)
    run.sampler.sample = lambda: [0, 1, 2, 3]  # type: ignore[method-assign]
    assert isinstance(run.rl, RLVRLoop)
    metrics = orchestrator.train_step(run)
    # The second epoch sees the policy the first one moved: a ratio away from 1 on (almost) every token.
    assert metrics["epoch"] == 2 and run.step == 2
    assert abs(metrics["ratio_mean"] - 1.0) > 1e-4
    if clipped:
        assert metrics["clip_fraction"] > 0.9
    else:
        assert metrics["clip_fraction"] == 0.0


def test_a_records_rollouts_together_move_the_clipped_sum_by_at_most_the_clip_norm() -> None:
    clip, group_size = 1e-4, 4
    config = build_config(
        {
            "mode": "rlvr",
            "dp": {"noise_multiplier": 1.0, "target_epsilon": None, "max_grad_norm": clip, "secure_rng": False},
            "training": {"batch_size": 4, "seed": 0},
            "lora": {"rank": 4, "seed": 0},
            "rl": {"group_size": group_size, "baseline": "none", "temperature": 1e-3, "max_tokens": 3},
        },
        environ={},
    )
    backend = fresh_plugin_manager(autoload=True).registry.ml_backend("torch")
    assert isinstance(backend, TorchBackend)
    backend.initialize_model(backend_config(config))
    perturb_lora_b(backend)
    batch = collect_rollouts(
        backend, RECORDS[:1], [0], constant_one, SamplingParams(max_tokens=3, temperature=1e-3), 4, seed_for
    )
    assert len({r.text for r in batch.rollouts}) == 1, "near-greedy rollouts of one prompt are identical"
    assign_advantages(batch, "none", normalize=False, running=None)
    backend.forward_backward(policy_data(batch), "importance_sampling")
    summed = torch.cat([p.summed_grad.flatten() for p in backend._params])
    # G identical rollout gradients, each clipped to C/G: together exactly C. Clipping each to C would give G*C.
    assert float(summed.norm()) == pytest.approx(clip, rel=1e-3)
    noise_std = backend._dp.noise_multiplier * backend._dp.max_grad_norm
    assert noise_std == pytest.approx(config.dp.noise_multiplier * clip)


def test_the_shipped_rlvr_example_config_validates() -> None:
    from tensafe.config import load_config

    config = load_config(Path(assets.__file__).parent / "rlvr.yaml")
    assert config.mode == "rlvr" and config.data.path is not None and config.data.path.is_file()
