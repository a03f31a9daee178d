"""The orchestrator: the façade over the engine (:mod:`tensafe.engine`).

The CLI, the SDK and the HTTP server all call it. It resolves backends from the
registry (never falling back to something weaker) and hands the work to the
engine's modules: the loop samples batches with Poisson sampling, the gate
admits each step before it runs and charges the accountant after, and every
value that leaves a run passes the gate's release policy.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tensafe.config import HEConfig, RunConfig
from tensafe.engine import loop, state
from tensafe.engine.gate import ReleaseGate, StepGate
from tensafe.engine.inference import Inference, sample_text
from tensafe.engine.ledger import PrivacyLedger
from tensafe.engine.packaging import package_adapter
from tensafe.engine.report import render_report
from tensafe.engine.run import TrainingRun
from tensafe.errors import UsageError
from tensafe.plugins import TensafePluginManager, create_plugin_manager

if TYPE_CHECKING:
    from tensafe.interfaces import MLBackend
    from tensafe.registry import Registry
    from tensafe.types import SampleResponse, SamplingParams

__all__ = ["PrivacyLedger", "TenSafeOrchestrator", "TrainingRun", "render_report"]


class TenSafeOrchestrator:
    """Resolves backends for a :class:`RunConfig` and runs the work it describes."""

    def __init__(self, config: RunConfig | None = None, *, plugin_manager: TensafePluginManager | None = None) -> None:
        self.config = config if config is not None else RunConfig()
        self.pm = plugin_manager if plugin_manager is not None else create_plugin_manager()
        #: Accept .tgsp packages whose (valid) signer is not trusted; set only on the user's explicit request.
        self.allow_untrusted_signer = False
        #: False in a worker other than rank 0 of a distributed run: its gate releases nothing.
        self.leader = True

    @property
    def registry(self) -> Registry:
        return self.pm.registry

    @property
    def gate(self) -> StepGate:
        """Step admission and the release gate, under this config's privacy policy."""
        return StepGate(self.pm, ReleaseGate.for_config(self.config), leader=self.leader)

    def audit(self, operation: str, subject: str, **details: Any) -> None:
        self.gate.audit(operation, subject, **details)

    # -- training -------------------------------------------------------------

    def training_backend(self) -> MLBackend:
        """The configured ML backend, refused if the config asks for DP it cannot do."""
        return loop.training_backend(self.config, self.registry)

    def calibrated_privacy(self, n_train: int | None, declared_rate: float | None = None) -> PrivacyLedger | None:
        """The privacy ledger; a calibrated noise multiplier is written back into the config."""
        self.config, privacy = loop.calibrate(self.config, self.registry, n_train, declared_rate)
        return privacy

    def prepare(self, *, resume_from: Path | None = None, distributed: bool = False) -> TrainingRun:
        """Resolve backends, load and split data, calibrate noise, load the model.

        ``resume_from``: the run directory a resume continues (keeps its noise multiplier).
        ``distributed``: this process is one of the workers a launcher (torchrun) started
        for the run; it joins the others (see docs/distributed.md).
        """
        run = loop.prepare(self.config, self.registry, resume_from=resume_from, distributed=distributed)
        self.config = run.config
        self.leader = run.leader
        return run

    def admit_step(
        self,
        run_id: str,
        next_step: int,
        batch_size: int,
        privacy: PrivacyLedger | None,
        *,
        steps_taken: int | None = None,
    ) -> None:
        """Ask the veto hooks, then the privacy budget, whether the work ending at ``next_step`` may run."""
        self.gate.admit(run_id, next_step, batch_size, privacy, steps_taken=steps_taken)

    def record_step(
        self, run_id: str, step: int, metrics: dict[str, float], privacy: PrivacyLedger | None
    ) -> dict[str, float]:
        """Charge the accountant for work that ran, then report, audit and warn; returns what was released."""
        return self.gate.record(run_id, step, metrics, privacy)

    def train_step(self, run: TrainingRun) -> dict[str, float]:
        """One step on a Poisson-sampled batch within the budget; returns the step's released metrics."""
        return loop.train_step(self.gate, run)

    def held_out(self, run: TrainingRun) -> tuple[str, float | None]:
        """The held-out measure (outside the guarantee): mean reward for RLVR, cross-entropy otherwise."""
        return loop.held_out(run)

    def save_checkpoint(self, run: TrainingRun, directory: Path) -> Path:
        return state.save_checkpoint(self.gate, run, directory)

    def load_checkpoint(self, run: TrainingRun, directory: Path) -> None:
        state.load_checkpoint(self.gate, run, directory)

    def run(
        self,
        *,
        run_dir: Path | None = None,
        evaluate: bool = True,
        prepared: TrainingRun | None = None,
        resume: bool = False,
    ) -> dict[str, Any]:
        """Train, export the adapter, and write checkpoints and the report into a run directory.

        With ``evaluate`` (``tensafe run``), also measure the held-out records and
        sample public probes before and after training; without it (``tensafe
        train``), only train. ``prepared`` is a run from :meth:`prepare`. With
        ``resume``, continue from the checkpoint in ``run_dir``.
        """
        run = prepared if prepared is not None else self.prepare(resume_from=run_dir if resume else None)
        if run_dir is None:
            if resume:
                raise UsageError("resuming needs the run directory to resume from")
            cfg = run.config
            run_dir = cfg.output_dir / (cfg.run_name or time.strftime("run-%Y%m%d-%H%M%S-") + run.run_id[:6])
        return loop.execute(self.gate, self.registry, run, run_dir, evaluate=evaluate, resume=resume)

    # -- packages and inference --------------------------------------------------

    def package_adapter(
        self, config: RunConfig, adapter_dir: Path, output: Path, privacy: PrivacyLedger | None
    ) -> dict[str, Any]:
        """Sign and encrypt an exported adapter with its privacy certificate."""
        certificate = privacy.certificate() if privacy is not None else None
        return package_adapter(self.gate, self.registry, config, adapter_dir, output, certificate)

    def _inference(self) -> Inference:
        he = self.config.he or HEConfig()
        return Inference(
            self.config, self.registry, self.gate, self.allow_untrusted_signer, he_mask_workers=he.mask_workers
        )

    def _inference_backend(self, adapter: Path | None) -> MLBackend:
        return self._inference().load(adapter, he=False)[0]

    def sample_text(
        self, backend: MLBackend, prompts: Sequence[str], sampling: SamplingParams, num_samples: int = 1
    ) -> list[SampleResponse]:
        """Generate from text prompts with the backend's current adapter."""
        return sample_text(backend, prompts, sampling, num_samples)

    def stream(self, prompt: str, *, adapter: Path | None = None, he: bool = False) -> Iterator[str]:
        """Generated text as it comes; errors surface before the first piece. ``he``: HE-LoRA."""
        return self._inference().stream(prompt, adapter=adapter, he=he)

    def generate(
        self,
        prompts: Sequence[str],
        *,
        adapter: Path | None = None,
        sampling: SamplingParams | None = None,
        num_samples: int = 1,
        he: bool = False,
    ) -> list[SampleResponse]:
        """Generate from the configured base model, with ``adapter`` (a directory or package) if given."""
        return self._inference().generate(prompts, adapter=adapter, sampling=sampling, num_samples=num_samples, he=he)
