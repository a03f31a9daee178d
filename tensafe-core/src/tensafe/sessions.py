"""Training and inference sessions on caller-supplied batches (the Tinker-style API).

The SDK (in-process) and the HTTP server drive sessions through these classes,
which go through the orchestrator's own step admission (veto hooks, privacy
budget) and step recording (accountant, release gate, report, audit, budget
warning), so the three doors behave alike. A session's whole state, backend
and privacy spend together, round-trips through
:meth:`TrainingSessionCore.snapshot` / :meth:`TrainingSessionCore.restore`.

The caller supplies the batches, so a session's privacy certificate states
what the caller must have done for epsilon to hold (``caller_duties``): draw
each batch by Poisson sampling at the declared rate and take an optimizer step
for every batch drawn, an empty one included. Under DP an ``optim_step`` with
nothing accumulated is such a step: the backend applies the noise alone, and
the step is admitted and charged like any other.

A session made over a dataset (``dataset=``, as the server does for an
uploaded one) has no caller duties: :meth:`TrainingSessionCore.train_step`
draws each batch itself by Poisson sampling from the OS CSPRNG, and under DP
releases only the step number and epsilon, as ``tensafe run`` does.
"""

from __future__ import annotations

import math
import random
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tensafe.api import PrivacySpent, TrainingSessionCreate
from tensafe.data import PoissonSampler, Record, tokenize_record, weight_total
from tensafe.engine.ledger import CALLER_DUTIES, PRIVACY_UNIT_DATASET, PRIVACY_UNIT_SESSION, SAMPLING_BY_SERVER
from tensafe.errors import UsageError
from tensafe.orchestrator import TenSafeOrchestrator

if TYPE_CHECKING:
    from tensafe.config import RunConfig, TGSPConfig
    from tensafe.engine.ledger import PrivacyLedger
    from tensafe.interfaces import MLBackend
    from tensafe.plugins import TensafePluginManager
    from tensafe.types import (
        AdamParams,
        Datum,
        ForwardBackwardOutput,
        LossFnType,
        OptimStepResponse,
        SampleResponse,
        SamplingParams,
    )

SNAPSHOT_FORMAT = "tensafe-session-1"
#: What a session hands its caller that the guarantee does not cover.
SESSION_OUTSIDE_GUARANTEE = (
    "forward_backward and forward results (per-datum logprobs, loss sums) and optim_step's batch_size and loss: "
    "computed from the caller's batches without noise, returned only to the caller",
)


DATASET_OUTSIDE_GUARANTEE = (
    "the number of records in the uploaded dataset: the sampling rate and the default delta are computed from it, "
    "as DP-SGD accounting assumes it public",
)


def privacy_spent(ledger: PrivacyLedger | None) -> PrivacySpent | None:
    """The caller's view of a ledger's certificate."""
    if ledger is None:
        return None
    return PrivacySpent.from_certificate(ledger.certificate())


class TrainingSessionCore:
    """A model with a LoRA adapter, trained step by step on batches the caller supplies,
    or on batches the session draws from ``dataset`` itself (:meth:`train_step`)."""

    def __init__(
        self,
        spec: TrainingSessionCreate,
        session_id: str,
        *,
        plugin_manager: TensafePluginManager | None = None,
        dataset: Sequence[Record] | None = None,
    ) -> None:
        config = spec.config
        if dataset is not None and spec.sampling_rate is not None:
            raise UsageError("a session over a dataset samples it itself: leave sampling_rate unset")
        if dataset is None and config.dp.enabled and spec.sampling_rate is None:
            raise UsageError(
                "a DP training session needs sampling_rate: the Poisson rate at which you draw batches "
                "(the accountant's epsilon assumes it)"
            )
        self.session_id = session_id
        self.spec = spec
        self.orchestrator = TenSafeOrchestrator(config.model_copy(deep=True), plugin_manager=plugin_manager)
        self.backend: MLBackend = self.orchestrator.training_backend()
        if dataset is None:
            self.privacy = self.orchestrator.calibrated_privacy(spec.dataset_size, spec.sampling_rate)
        else:
            self.privacy = self.orchestrator.calibrated_privacy(len(dataset))
        if self.privacy is not None:
            self.privacy.statement = {
                "mode": "session",
                "privacy_unit": PRIVACY_UNIT_SESSION if dataset is None else PRIVACY_UNIT_DATASET,
                "caller_duties": list(CALLER_DUTIES) if dataset is None else [],
                "outside_guarantee": list(SESSION_OUTSIDE_GUARANTEE if dataset is None else DATASET_OUTSIDE_GUARANTEE),
            }
            if dataset is not None:
                self.privacy.sampling = SAMPLING_BY_SERVER
        info = self.backend.initialize_model(self.config)
        #: The records this session samples its own batches from (None: the caller supplies batches).
        self.dataset: ServerSampling | None = None
        if dataset is not None:
            self.dataset = ServerSampling(self, dataset, info.eos_token_id)
        self.step = 0
        #: Data whose gradients are accumulated for the next optimizer step.
        self.accumulated = 0
        self.loss_sum = 0.0
        self.tokens = 0.0

    @property
    def config(self) -> RunConfig:
        return self.orchestrator.config

    def forward_backward(
        self,
        data: Sequence[Datum],
        loss_fn: LossFnType = "cross_entropy",
        loss_fn_config: Mapping[str, float] | None = None,
    ) -> ForwardBackwardOutput:
        self._caller_batches()
        out = self.backend.forward_backward(list(data), loss_fn, loss_fn_config)
        self.accumulated += len(data)
        self.loss_sum += out.metrics.get("loss:sum", 0.0)
        self.tokens += weight_total(data)
        return out

    def forward(
        self,
        data: Sequence[Datum],
        loss_fn: LossFnType = "cross_entropy",
        loss_fn_config: Mapping[str, float] | None = None,
    ) -> ForwardBackwardOutput:
        return self.backend.forward(list(data), loss_fn, loss_fn_config)

    def optim_step(self, adam_params: AdamParams | None = None) -> OptimStepResponse:
        """One optimizer step on the accumulated gradients, admitted and charged like a CLI step.

        Under DP a step with nothing accumulated (an empty Poisson batch) is a
        real step: the noise alone. Without DP it has nothing to apply and is refused.
        """
        self._caller_batches()
        return self._optim_step(adam_params)

    def _caller_batches(self) -> None:
        if self.dataset is not None:
            raise UsageError(
                "this session draws its batches from its dataset itself (that is what its epsilon assumes): "
                "call train_step, not forward_backward or optim_step"
            )

    def train_step(self, adam_params: AdamParams | None = None) -> OptimStepResponse:
        """One step on a batch Poisson-sampled from the session's dataset, admitted and charged.

        The batch is drawn only once the step is admitted (a refused step
        draws nothing). Under DP the result carries the step number and
        epsilon, nothing computed from the batch; without DP its loss and size too.
        """
        if self.dataset is None:
            raise UsageError("train_step needs a session over a dataset; this one takes your batches")
        return self.dataset.step(adam_params or self.config.optimizer)

    def _optim_step(self, adam_params: AdamParams | None) -> OptimStepResponse:
        if self.accumulated == 0 and self.privacy is None:
            raise UsageError(
                "optim_step with no accumulated gradients: call forward_backward first "
                "(without DP an empty step has nothing to apply)"
            )
        # Under DP the hooks see the expected batch size: a Poisson batch's own size is private.
        shown = self.orchestrator.gate.release.batch_size(self.accumulated, self.config.training.batch_size)
        self.orchestrator.admit_step(self.session_id, self.step + 1, shown, self.privacy)
        result = self.backend.optim_step(adam_params or self.config.optimizer)
        self.step = result.step
        # The caller's own batch statistics go back to the caller; hooks and the
        # audit log get only what the release gate lets through (record_step).
        metrics: dict[str, float] = {"batch_size": float(self.accumulated)}
        if self.tokens:
            metrics["loss"] = self.loss_sum / self.tokens
        metrics.update({k: v for k, v in result.metrics.items() if k not in metrics})
        self.accumulated, self.loss_sum, self.tokens = 0, 0.0, 0.0
        self.orchestrator.record_step(self.session_id, self.step, dict(metrics), self.privacy)
        if self.privacy is not None:
            metrics["epsilon"] = self.privacy.epsilon()
        return result.model_copy(update={"metrics": metrics})

    def sample(
        self, prompts: Sequence[str], sampling: SamplingParams | None = None, num_samples: int = 1
    ) -> list[SampleResponse]:
        return self.orchestrator.sample_text(self.backend, prompts, sampling or self.config.sampling, num_samples)

    def privacy_spent(self) -> PrivacySpent | None:
        return privacy_spent(self.privacy)

    def epsilon(self) -> float | None:
        return self.privacy.epsilon() if self.privacy is not None else None

    # -- state ------------------------------------------------------------------

    def snapshot(self) -> tuple[bytes, dict[str, Any]]:
        """Backend state and session metadata (step, privacy spend), to be stored together."""
        meta = {
            "format": SNAPSHOT_FORMAT,
            "step": self.step,
            "privacy": self.privacy.to_state() if self.privacy is not None else None,
        }
        return self.backend.save_state(), meta

    def restore(self, state: bytes, meta: Mapping[str, Any], *, keep_higher_spend: bool = True) -> None:
        """Load a snapshot. Spend never goes down: a spend above the saved one is kept."""
        if meta.get("format") != SNAPSHOT_FORMAT:
            raise UsageError("not a TenSafe session state")
        if (meta["privacy"] is None) != (self.privacy is None):
            raise UsageError("the saved state and this session disagree on whether training is differentially private")
        saved = None
        if self.privacy is not None:
            # A saved spend that lags its own model (an edited record) is refused before anything is loaded.
            saved = type(self.privacy.accountant)()
            saved.load_state(meta["privacy"]["accountant_state"])
            if saved.steps * self.privacy.updates_per_charge != meta["step"]:
                raise UsageError(
                    f"saved state is torn: {saved.steps} steps accounted, {meta['step']} taken; it is refused"
                )
        step = self.backend.load_state(state)
        if step != meta["step"]:
            raise UsageError(f"saved state is torn: backend is at step {step}, session at {meta['step']}")
        if (
            self.privacy is not None
            and saved is not None
            and (not keep_higher_spend or saved.steps >= self.privacy.accountant.steps)
        ):
            self.privacy.restore(meta["privacy"])
        self.step = step
        self.accumulated, self.loss_sum, self.tokens = 0, 0.0, 0.0

    def export_tgsp(self, output: Path, tgsp: TGSPConfig | None = None) -> dict[str, Any]:
        """Write the adapter as a signed, encrypted TGSP package with the session's privacy certificate.

        ``tgsp``: the keys to sign and encrypt with, instead of the session config's.
        """
        config = self.config if tgsp is None else self.config.model_copy(update={"tgsp": tgsp})
        with tempfile.TemporaryDirectory(prefix="tensafe-export-") as scratch:
            adapter = Path(scratch) / "adapter"
            self.backend.export_adapter(adapter)
            return self.orchestrator.package_adapter(config, adapter, output, self.privacy)


class ServerSampling:
    """A session's own batches: Poisson sampling over its dataset from the OS CSPRNG.

    Each record is in a step's batch with probability q = batch_size / records,
    independently, as the accountant assumes; the draw is never seeded, saved
    or shown (under DP not even its size).
    """

    def __init__(self, session: TrainingSessionCore, records: Sequence[Record], eos_token_id: int | None) -> None:
        config = session.config
        self.session = session
        self.data = [tokenize_record(r, session.backend, eos_token_id, config.model.max_seq_len) for r in records]
        rate = session.privacy.sampling_rate if session.privacy else min(1.0, config.training.batch_size / len(records))
        self.sampler = PoissonSampler(len(self.data), rate, random.SystemRandom())

    def step(self, adam_params: AdamParams) -> OptimStepResponse:
        session, config = self.session, self.session.config
        gate = session.orchestrator.gate
        expected = config.training.batch_size
        gate.admit(session.session_id, session.step + 1, gate.release.batch_size(expected, expected), session.privacy)
        batch = [self.data[i] for i in self.sampler.sample()]
        loss_sum, tokens = 0.0, 0.0
        size = config.training.micro_batch_size
        for start in range(0, len(batch), size):
            micro = batch[start : start + size]
            loss_sum += session.backend.forward_backward(micro, "cross_entropy").metrics.get("loss:sum", 0.0)
            tokens += weight_total(micro)
        result = session.backend.optim_step(adam_params)
        session.step = result.step
        metrics: dict[str, float] = {"batch_size": float(len(batch)), "loss": loss_sum / tokens if tokens else math.nan}
        metrics.update({k: v for k, v in result.metrics.items() if k not in metrics})
        released = session.orchestrator.record_step(session.session_id, session.step, metrics, session.privacy)
        return result.model_copy(update={"metrics": {k: v for k, v in released.items() if math.isfinite(v)}})


class InferenceSessionCore:
    """A base model, optionally with an adapter (a PEFT directory or a verified .tgsp package)."""

    def __init__(
        self,
        config: RunConfig,
        session_id: str,
        *,
        adapter: Path | None = None,
        plugin_manager: TensafePluginManager | None = None,
    ) -> None:
        self.session_id = session_id
        self.orchestrator = TenSafeOrchestrator(config.model_copy(deep=True), plugin_manager=plugin_manager)
        self.backend = self.orchestrator._inference_backend(adapter)

    def generate(
        self, prompts: Sequence[str], sampling: SamplingParams | None = None, num_samples: int = 1
    ) -> list[SampleResponse]:
        cfg = self.orchestrator.config
        self.orchestrator.audit("inference.generate", self.session_id, prompts=len(prompts))
        return self.orchestrator.sample_text(self.backend, prompts, sampling or cfg.sampling, num_samples)
