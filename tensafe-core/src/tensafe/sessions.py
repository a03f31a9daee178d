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
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tensafe.api import PrivacySpent, TrainingSessionCreate
from tensafe.data import weight_total
from tensafe.engine.ledger import CALLER_DUTIES, PRIVACY_UNIT_SESSION
from tensafe.errors import UsageError
from tensafe.orchestrator import TenSafeOrchestrator

if TYPE_CHECKING:
    from tensafe.config import RunConfig
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


def privacy_spent(ledger: PrivacyLedger | None) -> PrivacySpent | None:
    """The caller's view of a ledger's certificate."""
    if ledger is None:
        return None
    return PrivacySpent.from_certificate(ledger.certificate())


class TrainingSessionCore:
    """A model with a LoRA adapter, trained step by step on batches the caller supplies."""

    def __init__(
        self, spec: TrainingSessionCreate, session_id: str, *, plugin_manager: TensafePluginManager | None = None
    ) -> None:
        config = spec.config
        if config.dp.enabled and spec.sampling_rate is None:
            raise UsageError(
                "a DP training session needs sampling_rate: the Poisson rate at which you draw batches "
                "(the accountant's epsilon assumes it)"
            )
        self.session_id = session_id
        self.spec = spec
        self.orchestrator = TenSafeOrchestrator(config.model_copy(deep=True), plugin_manager=plugin_manager)
        self.backend: MLBackend = self.orchestrator.training_backend()
        self.privacy = self.orchestrator.calibrated_privacy(spec.dataset_size, spec.sampling_rate)
        if self.privacy is not None:
            self.privacy.statement = {
                "mode": "session",
                "privacy_unit": PRIVACY_UNIT_SESSION,
                "caller_duties": list(CALLER_DUTIES),
                "outside_guarantee": list(SESSION_OUTSIDE_GUARANTEE),
            }
        self.backend.initialize_model(self.config)
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

    def export_tgsp(self, output: Path) -> dict[str, Any]:
        """Write the adapter as a signed, encrypted TGSP package with the session's privacy certificate."""
        with tempfile.TemporaryDirectory(prefix="tensafe-export-") as scratch:
            adapter = Path(scratch) / "adapter"
            self.backend.export_adapter(adapter)
            return self.orchestrator.package_adapter(self.config, adapter, output, self.privacy)


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
