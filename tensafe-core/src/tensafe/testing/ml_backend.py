"""Conformance tests for :class:`tensafe.interfaces.MLBackend`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from tensafe import capabilities
from tensafe.errors import TensafeError
from tensafe.interfaces import MLBackend
from tensafe.testing.distributed import DistributedConformance
from tensafe.testing.dp_audit import DPAuditConformance
from tensafe.testing.ml_backend_harness import TEXT
from tensafe.testing.support import requires_capability
from tensafe.types import Datum, ModelInfo, SamplingParams, datum_from_sequence

__all__ = ["TEXT", "MLBackendConformance"]

#: Probability ratios and advantages the policy-loss checks cycle through: inside and outside PPO's clip range,
#: with advantages of both signs.
POLICY_RATIOS = (0.5, 0.9, 1.0, 1.1, 1.5, 3.0)
POLICY_ADVANTAGES = (1.0, -1.0, 2.0, -0.5, 0.0)


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(math.fsum(math.exp(v - top) for v in values))


def ppo_objective(ratio: float, advantage: float, low: float, high: float) -> float:
    """PPO's clipped objective of one token: ``min(r A, clip(r, low, high) A)``."""
    return min(ratio * advantage, min(max(ratio, low), high) * advantage)


class MLBackendConformance(DPAuditConformance, DistributedConformance):
    """Subclass with ``backend_name = "..."`` to test a registered ML backend.

    The DP-SGD checks of :class:`~tensafe.testing.DPSGDConformance` and the
    white-box audit of :class:`~tensafe.testing.DPAuditConformance` are
    included; they run for backends that declare ``dp_sgd``. So are the
    multi-worker checks of :class:`~tensafe.testing.DistributedConformance`,
    for backends that declare ``distributed`` (with ``dp_sgd`` and ``dp_probe``).
    """

    # -- the contract -------------------------------------------------------------

    def test_is_an_ml_backend(self, backend: MLBackend) -> None:
        assert isinstance(backend, MLBackend)

    def test_encode_decode_round_trip(self, backend: MLBackend) -> None:
        tokens = backend.encode(TEXT)
        assert tokens and all(isinstance(t, int) for t in tokens)
        assert backend.decode(tokens).strip() == TEXT

    def test_forward_reports_logprobs_per_target(self, backend: MLBackend) -> None:
        datum = self.datum(backend, prompt="Q: fox? A:")
        out = backend.forward([datum], "cross_entropy")
        logprobs = out.loss_fn_outputs[0]["logprobs"]
        assert len(logprobs) == len(datum.model_input)
        assert all(lp <= 1e-6 and math.isfinite(lp) for lp in logprobs)
        expected = -sum(w * lp for w, lp in zip(datum.values("weights"), logprobs, strict=True))
        assert out.metrics["loss:sum"] == pytest.approx(expected, rel=1e-4, abs=1e-4)

    def test_zero_weights_give_zero_loss(self, backend: MLBackend) -> None:
        datum = self.datum(backend)
        silent = Datum(
            model_input=datum.model_input,
            loss_fn_inputs={"target_tokens": datum.target_tokens, "weights": [0.0] * len(datum.model_input)},
        )
        assert backend.forward([silent], "cross_entropy").metrics["loss:sum"] == pytest.approx(0.0, abs=1e-6)

    def test_forward_is_repeatable(self, backend: MLBackend) -> None:
        datum = self.datum(backend)
        first = backend.forward([datum], "cross_entropy").loss_fn_outputs[0]["logprobs"]
        second = backend.forward([datum], "cross_entropy").loss_fn_outputs[0]["logprobs"]
        assert first == pytest.approx(second, abs=1e-6)

    def test_training_reduces_loss(self, backend: MLBackend) -> None:
        data = [self.datum(backend)]
        losses = [self.step(backend, data) for _ in range(8)]
        assert losses[-1] < 0.95 * losses[0], losses

    def test_optim_step_counts_steps(self, backend: MLBackend) -> None:
        data = [self.datum(backend)]
        backend.forward_backward(data, "cross_entropy")
        assert backend.optim_step(self.adam_params()).step == 1
        backend.forward_backward(data, "cross_entropy")
        assert backend.optim_step(self.adam_params()).step == 2

    def test_sample_honours_max_tokens(self, backend: MLBackend) -> None:
        prompt = backend.encode("the quick")
        [response] = backend.sample([prompt], SamplingParams(max_tokens=5, temperature=1.0), num_samples=3)
        assert len(response.sequences) == 3
        for seq in response.sequences:
            assert 1 <= len(seq.tokens) <= 5
            assert len(seq.logprobs) == len(seq.tokens)
            assert all(lp <= 1e-6 for lp in seq.logprobs)
            assert seq.stop_reason in ("length", "stop")
            assert seq.stop_reason == "stop" or len(seq.tokens) == 5

    def test_greedy_sampling_is_deterministic(self, backend: MLBackend) -> None:
        prompt = backend.encode("the quick")
        params = SamplingParams(max_tokens=8, temperature=0.0)
        first = backend.sample([prompt], params)[0].sequences[0].tokens
        second = backend.sample([prompt], params)[0].sequences[0].tokens
        assert first == second

    @requires_capability(capabilities.SEEDED_SAMPLING)
    def test_seeded_sampling_is_reproducible(self, backend: MLBackend) -> None:
        prompt = backend.encode("the quick")
        params = SamplingParams(max_tokens=12, temperature=1.0, seed=1234)
        first = [s.tokens for s in backend.sample([prompt], params, num_samples=2)[0].sequences]
        second = [s.tokens for s in backend.sample([prompt], params, num_samples=2)[0].sequences]
        assert first == second

    def test_save_load_continue_matches_straight_through(self, backend: MLBackend) -> None:
        data = [self.datum(backend)]
        for _ in range(2):
            self.step(backend, data)
        state = backend.save_state()
        straight = [self.step(backend, data) for _ in range(2)]
        resumed = self.make_backend()
        assert resumed.load_state(state) == 2
        again = [self.step(resumed, data) for _ in range(2)]
        assert again == pytest.approx(straight, rel=1e-5)

    def test_load_state_rejects_garbage(self, backend: MLBackend) -> None:
        with pytest.raises(TensafeError):
            backend.load_state(b"\x00not a tensafe state")

    def test_exported_adapter_reloads_identically(self, backend: MLBackend, tmp_path: Path) -> None:
        data = [self.datum(backend)]
        for _ in range(3):
            self.step(backend, data)
        files = backend.export_adapter(tmp_path / "adapter")
        assert files and all(Path(f).is_file() for f in files)
        reloaded = self.make_backend()
        reloaded.load_adapter(tmp_path / "adapter")
        expected = backend.forward(data, "cross_entropy").loss_fn_outputs[0]["logprobs"]
        actual = reloaded.forward(data, "cross_entropy").loss_fn_outputs[0]["logprobs"]
        assert actual == pytest.approx(expected, abs=1e-5)

    def test_empty_batch_is_an_error(self, backend: MLBackend) -> None:
        with pytest.raises(TensafeError):
            backend.forward_backward([], "cross_entropy")

    def test_token_outside_vocabulary_is_an_error(self, backend: MLBackend) -> None:
        bad = Datum(model_input=[10**9], loss_fn_inputs={"target_tokens": [0], "weights": [1.0]})
        with pytest.raises(TensafeError):
            backend.forward_backward([bad], "cross_entropy")

    def test_unknown_loss_is_an_error(self, backend: MLBackend) -> None:
        with pytest.raises(TensafeError):
            backend.forward_backward([self.datum(backend)], "no_such_loss")  # type: ignore[arg-type]

    # -- loss formulas (docs/plugins.md, "Losses") --------------------------------

    def policy_datum(self, backend: MLBackend) -> tuple[Datum, list[float], list[float], list[float]]:
        """A datum whose sampler logprobs give the current model chosen probability ratios.

        Returns it with its weights, ratios and advantages; the first position
        has weight 0, like a prompt token.
        """
        base = self.datum(backend)
        model = backend.forward([base], "cross_entropy").loss_fn_outputs[0]["logprobs"]
        n = len(model)
        ratios = [POLICY_RATIOS[i % len(POLICY_RATIOS)] for i in range(n)]
        advantages = [POLICY_ADVANTAGES[i % len(POLICY_ADVANTAGES)] for i in range(n)]
        weights = [0.0] + [1.0] * (n - 1)
        sampler = [lp - math.log(r) for lp, r in zip(model, ratios, strict=True)]
        datum = Datum(
            model_input=base.model_input,
            loss_fn_inputs={
                "target_tokens": base.target_tokens,
                "weights": weights,
                "logprobs": sampler,
                "advantages": advantages,
            },
        )
        return datum, weights, ratios, advantages

    def test_cross_entropy_loss_sums_over_tokens_and_data(self, backend: MLBackend) -> None:
        first, second = self.datum(backend), self.datum(backend, text="over the lazy dog")
        halved = Datum(
            model_input=second.model_input,
            loss_fn_inputs={"target_tokens": second.target_tokens, "weights": [0.5] * len(second.model_input)},
        )
        out = backend.forward([first, halved], "cross_entropy")
        expected = -sum(
            w * lp
            for datum, output in zip([first, halved], out.loss_fn_outputs, strict=True)
            for w, lp in zip(datum.values("weights"), output["logprobs"], strict=True)
        )
        assert out.metrics["loss:sum"] == pytest.approx(expected, rel=1e-4, abs=1e-4)

    @requires_capability(capabilities.POLICY_LOSSES)
    def test_importance_sampling_loss_is_minus_ratio_times_advantage(self, backend: MLBackend) -> None:
        datum, weights, ratios, advantages = self.policy_datum(backend)
        out = backend.forward([datum], "importance_sampling")
        expected = -sum(w * r * a for w, r, a in zip(weights, ratios, advantages, strict=True))
        assert out.metrics["loss:sum"] == pytest.approx(expected, rel=1e-4, abs=1e-4), "no clipping in this loss"

    @requires_capability(capabilities.POLICY_LOSSES)
    @pytest.mark.parametrize("clip", [None, (0.95, 1.05)])
    def test_ppo_loss_is_the_clipped_objective(self, backend: MLBackend, clip: tuple[float, float] | None) -> None:
        datum, weights, ratios, advantages = self.policy_datum(backend)
        low, high = clip or (0.8, 1.2)
        config = None if clip is None else {"clip_low_threshold": low, "clip_high_threshold": high}
        out = backend.forward([datum], "ppo", config)
        expected = -sum(w * ppo_objective(r, a, low, high) for w, r, a in zip(weights, ratios, advantages, strict=True))
        assert out.metrics["loss:sum"] == pytest.approx(expected, rel=1e-4, abs=1e-4)

    # -- sampling contract (docs/plugins.md, "Sampling") ----------------------------

    def initialized(self) -> tuple[MLBackend, ModelInfo]:
        backend = self.new_backend()
        return backend, backend.initialize_model(self.run_config())

    def next_token_logprobs(self, backend: MLBackend, prompt: list[int], vocab_size: int) -> list[float]:
        """log p(v | prompt) under the model, for every token v, read through ``forward``."""
        logprobs: list[float] = []
        for start in range(0, vocab_size, 256):
            data = [
                Datum(
                    model_input=prompt,
                    loss_fn_inputs={"target_tokens": [*prompt[1:], v], "weights": [0.0] * (len(prompt) - 1) + [1.0]},
                )
                for v in range(start, min(start + 256, vocab_size))
            ]
            out = backend.forward(data, "cross_entropy")
            logprobs += [row["logprobs"][-1] for row in out.loss_fn_outputs]
        return logprobs

    def test_sample_logprobs_are_those_of_the_distribution_sampled_from(self) -> None:
        backend, info = self.initialized()
        data = [self.datum(backend)]
        for _ in range(3):  # away from a uniform start, where every temperature gives the same distribution
            self.step(backend, data)
        prompt = backend.encode("the quick")
        model = self.next_token_logprobs(backend, prompt, info.vocab_size)
        assert _logsumexp(model) == pytest.approx(0.0, abs=1e-3), "forward's logprobs over the vocabulary sum to 1"

        [greedy] = backend.sample([prompt], SamplingParams(max_tokens=1, temperature=0.0))[0].sequences
        assert greedy.tokens[0] == max(range(info.vocab_size), key=model.__getitem__)
        assert greedy.logprobs[0] == pytest.approx(model[greedy.tokens[0]], abs=1e-3), "greedy: the model's logprob"
        for temperature in (0.5, 2.0):
            tempered = [m / temperature for m in model]
            norm = _logsumexp(tempered)
            params = SamplingParams(max_tokens=1, temperature=temperature)
            for seq in backend.sample([prompt], params, num_samples=4)[0].sequences:
                assert seq.logprobs[0] == pytest.approx(tempered[seq.tokens[0]] - norm, abs=1e-3), (
                    f"at temperature {temperature}, the logprob of the tempered distribution the token was drawn from"
                )

    def test_sample_includes_eos_in_tokens(self) -> None:
        backend, info = self.initialized()
        if info.eos_token_id is None:
            pytest.skip("the model has no end-of-sequence token")
        prompt = backend.encode(TEXT)
        data = [datum_from_sequence([*prompt, info.eos_token_id], prompt_length=len(prompt))]
        greedy = SamplingParams(max_tokens=4, temperature=0.0)
        for _ in range(40):  # teach it to end the text: EOS becomes the greedy next token
            [seq] = backend.sample([prompt], greedy)[0].sequences
            if seq.tokens[0] == info.eos_token_id:
                break
            self.step(backend, data)
        assert seq.tokens == [info.eos_token_id], "generation stops at EOS, and EOS is the last token returned"
        assert len(seq.logprobs) == 1 and seq.logprobs[0] <= 1e-6
        assert seq.stop_reason == "stop"

    @requires_capability(capabilities.LORA_DELTA)
    def test_lora_delta_reproduces_the_adapter(self, backend: MLBackend, tmp_path: Path) -> None:
        # The deltas computed in plaintext from read_lora's matrices stand in for HE's.
        data = [self.datum(backend)]
        for _ in range(3):
            self.step(backend, data)
        backend.export_adapter(tmp_path / "adapter")
        expected = backend.forward(data, "cross_entropy").loss_fn_outputs[0]["logprobs"]
        modules = backend.read_lora(tmp_path / "adapter")
        served = self.make_backend()
        base = served.forward(data, "cross_entropy").loss_fn_outputs[0]["logprobs"]

        def delta(name: str, x: Any) -> Any:
            a, b, scaling = modules[name]
            return scaling * (x @ a.T) @ b.T

        with served.lora_delta(list(modules), delta):
            actual = served.forward(data, "cross_entropy").loss_fn_outputs[0]["logprobs"]
        assert actual == pytest.approx(expected, abs=1e-4)
        assert max(abs(a - b) for a, b in zip(base, expected, strict=True)) > 1e-3
        assert served.forward(data, "cross_entropy").loss_fn_outputs[0]["logprobs"] == pytest.approx(base, abs=1e-6)
