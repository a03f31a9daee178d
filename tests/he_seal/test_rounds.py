"""Modules reading the same input share a round trip (tensafe.he.rounds.SharedInputDeltas), and a sibling whose
input differs from the one its delta was computed for asks on its own: the result never depends on the guess."""

from __future__ import annotations

from typing import Any

import numpy as np

from tensafe.config import HEConfig
from tensafe.he.rounds import SharedInputDeltas
from tensafe.he_lora import in_process
from tensafe_he_seal.backend import SealCKKSBackend

DELTA_BOUND = 1e-5


def test_siblings_share_a_round_and_a_changed_input_is_asked_for_alone() -> None:
    rng = np.random.default_rng(0)
    modules = {name: (rng.normal(0, 0.05, (2, 16)), rng.normal(0, 0.05, (24, 2)), 2.0) for name in ("q", "k", "v", "o")}
    _, evaluator = in_process(SealCKKSBackend, HEConfig(), modules)
    transport: Any = evaluator._transport
    deltas = SharedInputDeltas(evaluator)

    def expected(name: str, x: Any) -> Any:
        a, b, s = modules[name]
        return s * x @ a.T @ b.T

    def call(name: str, x: Any) -> None:
        assert np.max(np.abs(deltas(name, x) - expected(name, x))) < DELTA_BOUND

    first, second, third = (rng.normal(0, 1, (3, 16)) for _ in range(3))
    for name in ("q", "k", "v"):  # the first pass: one round each, and q, k, v learned as a group
        call(name, first)
    call("o", second)  # o reads another input: no group
    assert deltas.groups == {"q": ["q", "k", "v"]} and transport.rounds == 4
    for name in ("q", "k", "v"):
        call(name, second)
    call("o", third)
    assert transport.rounds == 6 and deltas.shared == 2  # q with k and v in one round, o in its own
    call("q", first)
    call("k", third)  # not the input k's delta was computed for: asked for alone, and right
    call("v", first)
    assert transport.rounds == 8 and deltas.shared == 3


def test_answers_over_the_limit_are_split_by_tokens() -> None:
    rng = np.random.default_rng(1)
    modules = {"q": (rng.normal(0, 0.05, (2, 16)), rng.normal(0, 0.05, (24, 2)), 2.0)}
    _, evaluator = in_process(SealCKKSBackend, HEConfig(), modules)
    transport: Any = evaluator._transport
    deltas = SharedInputDeltas(evaluator, max_answer_bytes=2 * 8 * 24)  # two tokens of 24 outputs per round
    x = rng.normal(0, 1, (5, 16))
    a, b, s = modules["q"]
    assert np.max(np.abs(deltas("q", x) - s * x @ a.T @ b.T)) < DELTA_BOUND
    assert transport.rounds == 3 and deltas.rounds == 3
