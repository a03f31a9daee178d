"""Conformance tests for :class:`tensafe.interfaces.MLBackend`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from tensafe import capabilities
from tensafe.errors import TensafeError
from tensafe.interfaces import MLBackend
from tensafe.testing.dp_sgd import DPSGDConformance
from tensafe.testing.ml_backend_harness import TEXT
from tensafe.testing.support import requires_capability
from tensafe.types import Datum, SamplingParams

__all__ = ["TEXT", "MLBackendConformance"]


class MLBackendConformance(DPSGDConformance):
    """Subclass with ``backend_name = "..."`` to test a registered ML backend.

    The DP-SGD checks of :class:`~tensafe.testing.DPSGDConformance` are included;
    they run for backends that declare ``dp_sgd``.
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
