"""Where the bigram backend's DP noise comes from: never from a saved state."""

from __future__ import annotations

import json

from tensafe.config import DPConfig, RunConfig
from tensafe.testing import fresh_plugin_manager
from tensafe.types import AdamParams, datum_from_sequence
from tensafe_bigram.backend import BigramBackend

DATUM = datum_from_sequence(list(b"the colour is blue"))


def bigram(secure_rng: bool) -> BigramBackend:
    backend = fresh_plugin_manager(autoload=True).registry.ml_backend("bigram")
    assert isinstance(backend, BigramBackend)
    dp = DPConfig(noise_multiplier=1.0, target_epsilon=None, secure_rng=secure_rng)
    backend.initialize_model(RunConfig(backend="bigram", dp=dp, training={"batch_size": 4, "seed": 3}))
    return backend


def dp_step(backend: BigramBackend) -> list[float]:
    backend.forward_backward([DATUM], "cross_entropy")
    backend.optim_step(AdamParams(learning_rate=0.05))
    return backend.noised_gradient()


def test_saved_state_holds_no_noise_generator() -> None:
    backend = bigram(secure_rng=False)
    dp_step(backend)
    assert set(json.loads(backend.save_state())) == {
        "format", "version", "vocab_size", "step", "adam_steps", "table", "adam_m", "adam_v", "sample_rng",
    }  # fmt: skip


def test_seeded_noise_resumes_as_the_uninterrupted_run() -> None:
    # Without secure_rng the noise of step t is seeded from (training.seed, t): reproducible, with no state saved.
    straight = bigram(secure_rng=False)
    expected = [dp_step(straight) for _ in range(3)][1:]
    first = bigram(secure_rng=False)
    dp_step(first)
    resumed = bigram(secure_rng=False)
    assert resumed.load_state(first.save_state()) == 1
    assert [dp_step(resumed) for _ in range(2)] == expected


def test_a_state_saved_with_a_noise_generator_loads_without_restoring_it() -> None:
    backend = bigram(secure_rng=True)
    dp_step(backend)
    state = json.loads(backend.save_state())
    state["noise_rng"] = [3, [0] * 625, None]
    resumed = bigram(secure_rng=True)
    assert resumed.load_state(json.dumps(state).encode()) == 1
    assert dp_step(resumed) != dp_step(backend)
