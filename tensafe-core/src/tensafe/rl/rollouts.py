"""Rollouts, their rewards and advantages, and the policy-loss data built from them.

Everything here is per record: a prompt's group of rollouts is scored, given
advantages and turned into data using nothing but that record, so removing a
record from a batch changes no other record's contribution. DP-RLVR relies on
it (see :mod:`tensafe.rl.privacy`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tensafe.errors import BackendError
from tensafe.rl.rewards import score
from tensafe.types import Datum

if TYPE_CHECKING:
    from tensafe.data import Record
    from tensafe.interfaces import MLBackend, RewardFunction
    from tensafe.types import SamplingParams

#: Keeps normalised advantages finite when a group's rewards are all equal.
STD_EPS = 1e-6


@dataclass
class Rollout:
    """One sampled continuation of a record's prompt, with its reward (None when excluded)."""

    record: int
    prompt_tokens: list[int]
    tokens: list[int]
    logprobs: list[float]
    text: str
    reward: float | None
    error: str | None = None
    advantage: float = 0.0


@dataclass
class RolloutBatch:
    """The rollouts of one Poisson-sampled batch, grouped by record."""

    groups: list[list[Rollout]] = field(default_factory=list)

    @property
    def rollouts(self) -> list[Rollout]:
        return [r for group in self.groups for r in group]

    @property
    def scored(self) -> list[Rollout]:
        return [r for r in self.rollouts if r.reward is not None]

    @property
    def excluded(self) -> list[Rollout]:
        return [r for r in self.rollouts if r.reward is None]

    def mean_reward(self) -> float:
        rewards = [r.reward for r in self.scored if r.reward is not None]
        return sum(rewards) / len(rewards) if rewards else math.nan


def collect_rollouts(
    backend: MLBackend,
    records: Sequence[Record],
    indices: Sequence[int],
    reward: RewardFunction,
    sampling: SamplingParams,
    group_size: int,
    seed_for: Callable[[int], int],
) -> RolloutBatch:
    """Sample ``group_size`` continuations of each record's prompt and score each one.

    Each record's rollouts come from one ``sample`` call seeded by
    ``seed_for(index)`` (secret CSPRNG seeds under DP), so they depend on that
    record alone, never on which other records were sampled with it. A
    backend that returns more than ``group_size`` sequences for a prompt is an
    error: DP-RLVR's clipping to ``C / group_size`` bounds a record's
    influence only if it has at most that many. A reward that raises or is not
    finite excludes that rollout only; the batch carries the reason.
    """
    batch = RolloutBatch()
    for index in indices:
        record = records[index]
        prompt = backend.encode(record.prompt)
        responses = backend.sample([prompt], sampling.model_copy(update={"seed": seed_for(index)}), group_size)
        if len(responses) != 1 or len(responses[0].sequences) > group_size:
            got = sum(len(r.sequences) for r in responses)
            raise BackendError(
                f"the ML backend returned {got} sequences for one prompt where {group_size} were asked for"
            )
        group = []
        for seq in responses[0].sequences:
            result = score(reward, record.prompt, seq.text, record.completion)
            group.append(
                Rollout(
                    record=index,
                    prompt_tokens=list(prompt),
                    tokens=list(seq.tokens),
                    logprobs=list(seq.logprobs),
                    text=seq.text,
                    reward=result if isinstance(result, float) else None,
                    error=result if isinstance(result, str) else None,
                )
            )
        batch.groups.append(group)
    return batch


def assign_advantages(batch: RolloutBatch, baseline: str, normalize: bool, running: float | None) -> None:
    """Set each scored rollout's advantage: its reward minus the baseline, optionally over the group's std.

    ``baseline`` is 'group' (mean of the record's own scored rollouts), 'running'
    (the value ``running``) or 'none'. Excluded rollouts keep advantage 0.
    """
    for group in batch.groups:
        rewards = [r.reward for r in group if r.reward is not None]
        if not rewards:
            continue
        mean = sum(rewards) / len(rewards)
        base = mean if baseline == "group" else (running or 0.0) if baseline == "running" else 0.0
        scale = 1.0
        if normalize and len(rewards) > 1:
            std = math.sqrt(sum((x - mean) ** 2 for x in rewards) / (len(rewards) - 1))
            scale = 1.0 / (std + STD_EPS)
        for rollout in group:
            if rollout.reward is not None:
                rollout.advantage = (rollout.reward - base) * scale


def policy_datum(rollout: Rollout) -> Datum:
    """The ``importance_sampling`` / ``ppo`` datum of a rollout.

    Prompt positions get weight 0, advantage 0 and an unused logprob of 0, so
    only the sampled tokens carry loss; their sampler logprobs make the ratio.
    """
    prompt, tokens = rollout.prompt_tokens, rollout.tokens
    sequence = prompt + tokens
    n_prompt = len(prompt) - 1
    return Datum(
        model_input=sequence[:-1],
        loss_fn_inputs={
            "target_tokens": sequence[1:],
            "weights": [0.0] * n_prompt + [1.0] * len(tokens),
            "logprobs": [0.0] * n_prompt + list(rollout.logprobs),
            "advantages": [0.0] * n_prompt + [rollout.advantage] * len(tokens),
        },
    )


def policy_data(batch: RolloutBatch) -> list[Datum]:
    """The data of every scored rollout that has at least one sampled token."""
    return [policy_datum(r) for r in batch.scored if r.tokens]
