"""The RLVR update loop: REINFORCE with a baseline, or PPO, on batches the step gate admits.

The engine owns everything a step shares with supervised training: Poisson
sampling, the veto hook, the budget check, privacy accounting, the release
gate, checkpoints and the run report; this loop reaches it through the
:class:`~tensafe.engine.gate.StepGate` only. It does the RL part in between:
rollouts through ``MLBackend.sample``, rewards, advantages and updates through
``forward_backward`` with the backend's policy losses.

Rollout randomness is per record: each sampled record's rollouts get their own
seed, drawn from the OS CSPRNG under DP with ``dp.secure_rng`` (never saved),
so one record's rollouts are independent of the rest of the batch and of
anything a checkpoint holds.
"""

from __future__ import annotations

import math
import random
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tensafe.errors import UsageError
from tensafe.rl.rewards import score
from tensafe.rl.rollouts import RolloutBatch, assign_advantages, collect_rollouts, policy_data
from tensafe.types import SamplingParams

if TYPE_CHECKING:
    from tensafe.config import RLConfig
    from tensafe.data import Record
    from tensafe.engine.gate import StepGate
    from tensafe.engine.run import TrainingRun
    from tensafe.interfaces import MLBackend, RewardFunction
    from tensafe.types import Datum

LOSSES = {"reinforce": "importance_sampling", "ppo": "ppo"}


@dataclass
class RLVRLoop:
    """RL state of a run (saved with every checkpoint) and its step."""

    config: RLConfig
    reward: RewardFunction
    iterations: int = 0
    running_baseline: float | None = None
    excluded_total: int = 0
    #: Whether any update of this process had a non-zero advantage (else an unchanged adapter is expected).
    had_signal: bool = False

    # -- state ----------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {
            "iterations": self.iterations,
            "running_baseline": self.running_baseline,
            "excluded_total": self.excluded_total,
            "config": self.config.model_dump(mode="json"),
        }

    def restore(self, state: dict[str, Any] | None) -> None:
        """Take over a saved RL state; refuses one made with other RL settings."""
        if state is None:
            raise UsageError("the checkpoint holds no RL state; it was not written by an rlvr run")
        if state["config"] != self.config.model_dump(mode="json"):
            raise UsageError("the checkpoint was made with other rl settings; resume with the same config")
        self.iterations = int(state["iterations"])
        baseline = state["running_baseline"]
        self.running_baseline = None if baseline is None else float(baseline)
        self.excluded_total = int(state["excluded_total"])

    # -- sampling and evaluation ----------------------------------------------

    def sampling(self, *, greedy: bool = False) -> SamplingParams:
        return SamplingParams(
            max_tokens=self.config.max_tokens,
            temperature=0.0 if greedy else self.config.temperature,
            stop=list(self.config.stop) or None,
        )

    def held_out_reward(self, backend: MLBackend, records: Sequence[Record]) -> float | None:
        """Mean reward of greedy completions of held-out prompts; a failing reward counts as 0."""
        chosen = [r for r in records if r.prompt][: self.config.eval_prompts]
        if not chosen:
            return None
        responses = backend.sample([backend.encode(r.prompt) for r in chosen], self.sampling(greedy=True))
        total = 0.0
        for record, response in zip(chosen, responses, strict=True):
            value = score(self.reward, record.prompt, response.sequences[0].text, record.completion)
            total += value if isinstance(value, float) else 0.0
        return total / len(chosen)

    # -- one step -------------------------------------------------------------

    def _update(self, run: TrainingRun, data: list[Datum]) -> dict[str, float]:
        """``epochs`` optimizer steps on the batch's data; returns the last epoch's metrics."""
        loss_fn = LOSSES[self.config.algorithm]
        loss_config = (
            {"clip_low_threshold": self.config.clip_low, "clip_high_threshold": self.config.clip_high}
            if self.config.algorithm == "ppo"
            else None
        )
        size = run.config.training.micro_batch_size
        metrics: dict[str, float] = {}
        for epoch in range(self.config.epochs):
            loss, tokens, weighted = 0.0, 0.0, {"kl_sampler": 0.0, "clip_fraction": 0.0, "ratio_mean": 0.0}
            for start in range(0, len(data), size):
                micro = data[start : start + size]
                out = run.backend.forward_backward(micro, loss_fn, loss_config)  # type: ignore[arg-type]
                count = sum(sum(d.values("weights")) for d in micro)
                loss += out.metrics["loss:sum"]
                tokens += count
                for key in weighted:
                    weighted[key] += out.metrics.get(key, 0.0) * count
            result = run.backend.optim_step(run.config.optimizer)
            run.step = result.step
            metrics = {"loss": loss / tokens if tokens else math.nan, "epoch": float(epoch + 1)}
            if tokens:
                metrics.update({key: value / tokens for key, value in weighted.items()})
            metrics.update(result.metrics)
        return metrics

    def _seeds(self, run: TrainingRun) -> Callable[[int], int]:
        """Each record's rollout seed: secret under DP with secure_rng, else reproducible from training.seed."""
        seed = run.config.training.seed
        if (run.privacy is not None and run.config.dp.secure_rng) or seed is None:
            return lambda _index: secrets.randbits(63)
        iteration = self.iterations
        return lambda index: random.Random(f"{seed}:{iteration}:{index}").getrandbits(63)

    def train_step(self, gate: StepGate, run: TrainingRun) -> dict[str, float]:
        """One sampled batch: rollouts, rewards, advantages, ``epochs`` updates, one privacy charge."""
        indices = gate.admit_batch(run, run.step + self.config.epochs)
        started = time.perf_counter()
        batch = collect_rollouts(
            run.backend,
            run.train_records,
            indices,
            self.reward,
            self.sampling(),
            self.config.group_size,
            self._seeds(run),
        )
        sampled = time.perf_counter()
        self._report_excluded(gate, run, batch)
        assign_advantages(batch, self.config.baseline, self.config.normalize_advantages, self.running_baseline)
        self.had_signal = self.had_signal or any(r.advantage != 0.0 for r in batch.scored)
        metrics = {
            "batch_size": float(len(indices)),
            "rollouts": float(len(batch.rollouts)),
            "excluded_rollouts": float(len(batch.excluded)),
            "reward": batch.mean_reward(),
        }
        metrics.update(self._update(run, policy_data(batch)))
        metrics["sample_seconds"] = sampled - started
        metrics["update_seconds"] = time.perf_counter() - sampled
        if self.config.baseline == "running" and batch.scored:
            mean = batch.mean_reward()
            decay = self.config.running_decay
            self.running_baseline = (
                mean if self.running_baseline is None else decay * self.running_baseline + (1 - decay) * mean
            )
        self.iterations += 1
        return gate.commit_step(run, metrics)

    def _report_excluded(self, gate: StepGate, run: TrainingRun, batch: RolloutBatch) -> None:
        """Count excluded rollouts in the audit log: never which record or the reward's error text.

        Under DP even the count is a statistic of private records, so nothing is recorded.
        """
        if gate.release.private or not batch.excluded:
            return
        self.excluded_total += len(batch.excluded)
        gate.audit("rl.rollouts_excluded", run.run_id, step=run.step + 1, count=len(batch.excluded))
