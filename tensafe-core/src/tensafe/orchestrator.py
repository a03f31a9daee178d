"""The orchestrator: the one place that turns a configuration into work.

The CLI, the SDK and the HTTP server all call it. It resolves backends from the
registry (never falling back to something weaker), samples batches with Poisson
sampling, charges the privacy accountant for every optimizer step and refuses a
step that would exceed the budget, drives the lifecycle hooks, and writes the
run's artifacts and report.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tensafe import capabilities
from tensafe.audit import AuditEvent
from tensafe.config import DPConfig, RunConfig
from tensafe.data import PoissonSampler, Record, load_records, split_records, tokenize_record
from tensafe.errors import BackendError, PrivacyBudgetExceeded, StepVetoed, UsageError
from tensafe.plugins import TensafePluginManager, create_plugin_manager

if TYPE_CHECKING:
    from tensafe.interfaces import MLBackend, PrivacyAccountant
    from tensafe.registry import Registry
    from tensafe.types import Datum, SampleResponse, SamplingParams

EVAL_SAMPLES = 3
REPORT_MARKS = 6
CHECKPOINT_FORMAT = "tensafe-checkpoint-1"
BACKEND_STATE = "backend_state.bin"
PROGRESS = "progress.json"
CHECKPOINT_DIR = "checkpoint"
#: How the certificate describes the sampling its epsilon assumes.
SAMPLING_BY_ORCHESTRATOR = "poisson, by the orchestrator"
SAMPLING_DECLARED = (
    "poisson at a rate declared by the caller, who supplied the batches (an assumption, not a guarantee)"
)


EMBEDDED_MODEL_ID = "tensafe-embedded-tiny-llama"


def base_model_id(config: RunConfig) -> str:
    """How packages name the base model: its path or hub id, or the embedded model's id."""
    return config.model.path or EMBEDDED_MODEL_ID


def _rng_state(rng: random.Random) -> list[Any] | None:
    if isinstance(rng, random.SystemRandom):
        return None
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _weight_total(data: Sequence[Datum]) -> float:
    """How many tokens a batch's cross-entropy loss counts (its summed weights)."""
    return sum(sum(d.values("weights", 1.0)) for d in data)


def _restore_rng(rng: random.Random, state: list[Any] | None) -> None:
    if state is not None:
        rng.setstate((state[0], tuple(state[1]), state[2]))


@dataclass
class PrivacyLedger:
    """The run's privacy spend: an accountant plus the parameters it is charged with."""

    accountant_name: str
    accountant: PrivacyAccountant
    sampling_rate: float
    noise_multiplier: float
    delta: float
    target_epsilon: float | None
    warn_fraction: float
    secure_rng: bool
    warned: bool = False
    sampling: str = SAMPLING_BY_ORCHESTRATOR

    def epsilon(self) -> float:
        return self.accountant.get_epsilon(self.delta)

    def check_budget(self, steps: int) -> None:
        """Refuse (before it runs) a step that would take the spend past the target epsilon."""
        if self.target_epsilon is None:
            return
        would_be = self.epsilon_after_next_step()
        if would_be > self.target_epsilon:
            raise PrivacyBudgetExceeded(
                epsilon=self.epsilon(),
                delta=self.delta,
                steps=steps,
                target_epsilon=self.target_epsilon,
                would_be=would_be,
            )

    def epsilon_after_next_step(self) -> float:
        """Epsilon the run would reach after one more step, computed on a copy."""
        trial = type(self.accountant)()
        trial.load_state(self.accountant.state())
        trial.compose_step(self.sampling_rate, self.noise_multiplier)
        return trial.get_epsilon(self.delta)

    def certificate(self) -> dict[str, Any]:
        return {
            "accountant": self.accountant_name,
            "epsilon": self.epsilon(),
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
            "steps": self.accountant.steps,
            "sampling_rate": self.sampling_rate,
            "noise_multiplier": self.noise_multiplier,
            "neighbouring_relation": "add_or_remove_one",
            "sampling": self.sampling,
            "randomness": "os-csprng" if self.secure_rng else "seeded (no guarantee against whoever knows the seed)",
        }

    def to_state(self) -> dict[str, Any]:
        return {
            "accountant": self.accountant_name,
            "accountant_state": self.accountant.state(),
            "sampling_rate": self.sampling_rate,
            "noise_multiplier": self.noise_multiplier,
            "delta": self.delta,
            "warned": self.warned,
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Take over a saved spend; refuses one made with other privacy parameters."""
        mine = (self.accountant_name, self.sampling_rate, self.noise_multiplier, self.delta)
        theirs = (state["accountant"], state["sampling_rate"], state["noise_multiplier"], state["delta"])
        if mine != theirs:
            raise UsageError(f"checkpoint was made with accountant, q, sigma, delta = {theirs}, not {mine}")
        self.accountant.load_state(state["accountant_state"])
        self.warned = bool(state["warned"])


@dataclass
class TrainingRun:
    """A live training run: backend, data, privacy ledger and step counter."""

    run_id: str
    config: RunConfig
    backend: MLBackend
    train_data: list[Datum]
    eval_data: list[Datum]
    eval_records: list[Record]
    sampler: PoissonSampler
    rng: random.Random
    privacy: PrivacyLedger | None
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


class TenSafeOrchestrator:
    """Resolves backends for a :class:`RunConfig` and runs the work it describes."""

    def __init__(self, config: RunConfig | None = None, *, plugin_manager: TensafePluginManager | None = None) -> None:
        self.config = config if config is not None else RunConfig()
        self.pm = plugin_manager if plugin_manager is not None else create_plugin_manager()
        #: Accept .tgsp packages whose (valid) signer is not trusted; set only on the user's explicit request.
        self.allow_untrusted_signer = False

    @property
    def registry(self) -> Registry:
        return self.pm.registry

    # -- events ---------------------------------------------------------------

    def audit(self, operation: str, subject: str, **details: Any) -> None:
        self.pm.hook.tensafe_record_audit(event=AuditEvent(operation, subject, details))

    # -- training -------------------------------------------------------------

    def _records(self, backend: MLBackend) -> list[Record]:
        path = self.config.data.path or backend.default_dataset()
        if path is None:
            raise UsageError(f"no dataset configured and ML backend {self.config.backend!r} ships none; set data.path")
        return load_records(Path(path), max_records=self.config.data.max_records)

    def _privacy(self, n_train: int | None, declared_rate: float | None = None) -> PrivacyLedger | None:
        """The ledger for a run over ``n_train`` records, sampled by the orchestrator.

        With ``declared_rate`` the caller supplies the batches and declares their
        sampling rate; ``n_train`` (if known) then only sets the default delta.
        """
        dp, training = self.config.dp, self.config.training
        if not dp.enabled:
            return None
        accountant = self.registry.accountant(dp.accountant)
        if declared_rate is None:
            assert n_train is not None
            sampling_rate = min(1.0, training.batch_size / n_train)
        else:
            sampling_rate = declared_rate
        if dp.target_delta is None and n_train is None:
            raise UsageError("set dp.target_delta, or declare the dataset size so delta defaults to 1 / (10 n)")
        delta = dp.target_delta if dp.target_delta is not None else 1.0 / (10 * (n_train or 1))
        if n_train is not None and delta >= 1.0 / n_train:
            raise UsageError(f"dp.target_delta {delta:g} must be below 1 / records ({1.0 / n_train:g})")
        sigma = dp.noise_multiplier
        if sigma is None:
            assert dp.target_epsilon is not None  # guaranteed by DPConfig
            sigma = accountant.calibrate_noise_multiplier(dp.target_epsilon, delta, sampling_rate, training.steps)
        return PrivacyLedger(
            dp.accountant,
            accountant,
            sampling_rate,
            sigma,
            delta,
            dp.target_epsilon,
            dp.warn_fraction,
            dp.secure_rng,
            sampling=SAMPLING_BY_ORCHESTRATOR if declared_rate is None else SAMPLING_DECLARED,
        )

    def training_backend(self) -> MLBackend:
        """The configured ML backend, refused if the config asks for DP it cannot do."""
        backend = self.registry.ml_backend(self.config.backend)
        if self.config.dp.enabled and not capabilities.has(backend, capabilities.DP_SGD):
            raise UsageError(
                f"ML backend {self.config.backend!r} does not implement DP-SGD; use a backend that does, "
                "or set dp.enabled: false (and give up every privacy claim)"
            )
        return backend

    def calibrated_privacy(self, n_train: int | None, declared_rate: float | None = None) -> PrivacyLedger | None:
        """The privacy ledger; a calibrated noise multiplier is written back into the config."""
        privacy = self._privacy(n_train, declared_rate)
        if privacy is not None and self.config.dp.noise_multiplier is None:
            dp = self.config.dp.model_copy(update={"noise_multiplier": privacy.noise_multiplier})
            self.config = self.config.model_copy(update={"dp": dp})
        return privacy

    def prepare(self) -> TrainingRun:
        """Resolve backends, load and split data, calibrate noise, load the model."""
        backend = self.training_backend()
        self._check_packaging()
        train_records, eval_records = split_records(self._records(backend), self.config.data.eval_fraction)
        privacy = self.calibrated_privacy(len(train_records))
        cfg = self.config
        info = backend.initialize_model(cfg)

        def tokenize(records: Sequence[Record]) -> list[Datum]:
            return [tokenize_record(r, backend.encode, info.eos_token_id, cfg.model.max_seq_len) for r in records]

        secure = privacy is not None and cfg.dp.secure_rng
        rng = random.SystemRandom() if secure or cfg.training.seed is None else random.Random(cfg.training.seed)
        sampling_rate = privacy.sampling_rate if privacy else min(1.0, cfg.training.batch_size / len(train_records))
        return TrainingRun(
            run_id=uuid.uuid4().hex[:12],
            config=cfg,
            backend=backend,
            train_data=tokenize(train_records),
            eval_data=tokenize(eval_records),
            eval_records=eval_records,
            sampler=PoissonSampler(len(train_records), sampling_rate, rng),
            rng=rng,
            privacy=privacy,
        )

    def held_out_loss(self, run: TrainingRun) -> float | None:
        """Mean cross-entropy per weighted token on the held-out records."""
        if not run.eval_data:
            return None
        total, tokens = 0.0, 0.0
        size = run.config.training.micro_batch_size
        for start in range(0, len(run.eval_data), size):
            out = run.backend.forward(run.eval_data[start : start + size], "cross_entropy")
            total += out.metrics["loss:sum"]
            tokens += _weight_total(run.eval_data[start : start + size])
        return total / tokens if tokens else None

    def admit_step(self, run_id: str, next_step: int, batch_size: int, privacy: PrivacyLedger | None) -> None:
        """Ask the veto hooks, then the privacy budget, whether step ``next_step`` may run."""
        reasons = [
            r for r in self.pm.hook.tensafe_approve_step(run_id=run_id, step=next_step, batch_size=batch_size) if r
        ]
        if reasons:
            raise StepVetoed(next_step, reasons)
        if privacy is not None:
            privacy.check_budget(next_step - 1)

    def record_step(self, run_id: str, step: int, metrics: dict[str, float], privacy: PrivacyLedger | None) -> None:
        """Charge the accountant for a step that ran, then report, audit and warn about it."""
        if privacy is not None:
            privacy.accountant.compose_step(privacy.sampling_rate, privacy.noise_multiplier)
            metrics["epsilon"] = privacy.epsilon()
        self.pm.hook.tensafe_report_step(run_id=run_id, step=step, metrics=dict(metrics))
        self.audit("train.step", run_id, step=step, **metrics)
        if (
            privacy is not None
            and privacy.target_epsilon is not None
            and not privacy.warned
            and metrics["epsilon"] >= privacy.warn_fraction * privacy.target_epsilon
        ):
            privacy.warned = True
            self.pm.hook.tensafe_warn_budget(
                run_id=run_id, epsilon=metrics["epsilon"], delta=privacy.delta, target_epsilon=privacy.target_epsilon
            )

    def train_step(self, run: TrainingRun) -> dict[str, float]:
        """One optimizer step on a Poisson-sampled batch, within the privacy budget."""
        cfg = run.config
        rng_before = _rng_state(run.rng)
        indices = run.sampler.sample()
        try:
            self.admit_step(run.run_id, run.step + 1, len(indices), run.privacy)
        except (StepVetoed, PrivacyBudgetExceeded):
            _restore_rng(run.rng, rng_before)  # a refused step leaves no trace, not even a drawn batch
            raise
        batch = [run.train_data[i] for i in indices]
        loss_sum, tokens = 0.0, 0.0
        size = cfg.training.micro_batch_size
        for start in range(0, len(batch), size):
            micro = batch[start : start + size]
            out = run.backend.forward_backward(micro, "cross_entropy")
            loss_sum += out.metrics["loss:sum"]
            tokens += _weight_total(micro)
        result = run.backend.optim_step(cfg.optimizer)
        run.step = result.step
        metrics: dict[str, float] = {"batch_size": float(len(batch)), "loss": loss_sum / tokens if tokens else math.nan}
        metrics.update({k: v for k, v in result.metrics.items() if k not in metrics})
        self.record_step(run.run_id, run.step, metrics, run.privacy)
        run.history.append({"step": float(run.step), **metrics})
        return metrics

    # -- checkpoints ----------------------------------------------------------

    def save_checkpoint(self, run: TrainingRun, directory: Path) -> Path:
        """Write backend state and privacy spend together, atomically: both or neither."""
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = directory.with_name(directory.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        (staging / BACKEND_STATE).write_bytes(run.backend.save_state())
        progress = {
            "format": CHECKPOINT_FORMAT,
            "run_id": run.run_id,
            "step": run.step,
            "history": run.history,
            "privacy": run.privacy.to_state() if run.privacy else None,
            "rng": _rng_state(run.rng),
        }
        (staging / PROGRESS).write_text(json.dumps(progress), encoding="utf-8")
        previous = directory.with_name(directory.name + ".old")
        shutil.rmtree(previous, ignore_errors=True)
        if directory.exists():
            directory.rename(previous)
        staging.rename(directory)
        shutil.rmtree(previous, ignore_errors=True)
        self.audit("checkpoint.write", str(directory), step=run.step)
        return directory

    def load_checkpoint(self, run: TrainingRun, directory: Path) -> None:
        """Resume ``run`` from a checkpoint: backend state, privacy spend, history and sampling RNG."""
        try:
            progress = json.loads((directory / PROGRESS).read_text(encoding="utf-8"))
            state = (directory / BACKEND_STATE).read_bytes()
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read checkpoint {directory}: {exc}") from None
        if not isinstance(progress, dict) or progress.get("format") != CHECKPOINT_FORMAT:
            raise UsageError(f"{directory} is not a TenSafe checkpoint")
        if (progress["privacy"] is None) != (run.privacy is None):
            raise UsageError("checkpoint and config disagree on whether training is differentially private")
        step = run.backend.load_state(state)
        if step != progress["step"]:
            raise UsageError(f"checkpoint is torn: backend is at step {step}, progress at {progress['step']}")
        if run.privacy is not None:
            run.privacy.restore(progress["privacy"])
            if run.privacy.accountant.steps != step:
                raise UsageError(f"checkpoint is torn: {run.privacy.accountant.steps} steps accounted, {step} taken")
        run.step = step
        run.run_id = progress["run_id"]
        run.history = progress["history"]
        if not isinstance(run.rng, random.SystemRandom):
            _restore_rng(run.rng, progress["rng"])
        self.audit("checkpoint.load", str(directory), step=step)

    def sample_text(
        self, backend: MLBackend, prompts: Sequence[str], sampling: SamplingParams, num_samples: int = 1
    ) -> list[SampleResponse]:
        """Generate from text prompts with the backend's current adapter."""
        if not prompts:
            raise UsageError("no prompts given")
        return backend.sample([backend.encode(p) for p in prompts], sampling, num_samples)

    # -- packages -------------------------------------------------------------

    def _packaging(self) -> bool:
        return self.config.tgsp is not None and self.config.tgsp.signing_key is not None

    def _check_packaging(self) -> None:
        """Fail before training, not after it, when a configured package cannot be written."""
        if not self._packaging():
            return
        tgsp = self.config.tgsp
        assert tgsp is not None and tgsp.signing_key is not None
        if not tgsp.recipients:
            raise UsageError("tgsp.recipients: name at least one recipient public key to encrypt the package to")
        for key in (tgsp.signing_key, *tgsp.recipients):
            if not key.is_file():
                raise UsageError(f"key file not found: {key}")
        self.registry.registration("tgsp_loader", tgsp.loader)

    def _package(self, run: TrainingRun, run_dir: Path) -> dict[str, Any]:
        tgsp = run.config.tgsp
        assert tgsp is not None
        return self.package_adapter(
            run.config, run_dir / "adapter", tgsp.output or run_dir / "adapter.tgsp", run.privacy
        )

    def package_adapter(
        self, config: RunConfig, adapter_dir: Path, output: Path, privacy: PrivacyLedger | None
    ) -> dict[str, Any]:
        """Sign and encrypt an exported adapter with its privacy certificate."""
        tgsp = config.tgsp
        if tgsp is None or tgsp.signing_key is None:
            raise UsageError("packaging needs tgsp.signing_key and tgsp.recipients in the config")
        loader = self.registry.tgsp_loader(tgsp.loader)
        certificate = None
        if privacy is not None:
            certificate = {**privacy.certificate(), "max_grad_norm": config.dp.max_grad_norm}
        manifest = loader.pack(
            adapter_dir,
            output,
            signing_key=tgsp.signing_key,
            recipients=tgsp.recipients,
            base_model=base_model_id(config),
            lora_config=config.lora.model_dump(),
            privacy_certificate=certificate,
        )
        self.audit("artifact.package", str(output), package_id=manifest.get("package_id"))
        return {"path": str(output), "package_id": manifest.get("package_id")}

    def _open_package(self, package: Path, destination: Path, allow_untrusted_signer: bool) -> dict[str, Any]:
        tgsp = self.config.tgsp
        if tgsp is None or tgsp.recipient_key is None:
            raise UsageError("opening a .tgsp package needs your recipient key (tgsp.recipient_key / --recipient-key)")
        if not tgsp.trusted_signers and not allow_untrusted_signer:
            raise UsageError(
                "opening a .tgsp package needs the signer keys you trust (tgsp.trusted_signers / --trusted)"
            )
        loader = self.registry.tgsp_loader(tgsp.loader)
        manifest = loader.load(
            package,
            recipient_key=tgsp.recipient_key,
            trusted_signers=tgsp.trusted_signers,
            destination=destination,
            allow_untrusted_signer=allow_untrusted_signer,
            base_model=base_model_id(self.config),
        )
        self.audit(
            "artifact.open",
            str(package),
            package_id=manifest.get("package_id"),
            untrusted_signer_allowed=allow_untrusted_signer,
        )
        return manifest

    def _probe(self, run: TrainingRun, probe: list[Datum]) -> list[float]:
        return run.backend.forward(probe, "cross_entropy").loss_fn_outputs[0]["logprobs"] if probe else []

    def _adapter_change(self, before: list[float], after: list[float], trained: bool) -> float:
        """Largest change of a probe logprob; refuses a run whose adapter did not change at all.

        DP training with a broken per-sample-gradient setup can look normal (loss
        and epsilon move) while the adapter stays as initialised; this catches it.
        """
        change = max((abs(a - b) for a, b in zip(before, after, strict=True)), default=0.0)
        if trained and before and change == 0.0:
            raise BackendError(
                "training finished but the adapter did not change the model's outputs at all; "
                "the run is not usable (check the learning rate and that LoRA parameters receive gradients)"
            )
        return change

    def _eval_prompts(self, run: TrainingRun) -> list[str]:
        return [r.prompt for r in run.eval_records[:EVAL_SAMPLES] if r.prompt]

    def _inference_backend(self, adapter: Path | None) -> MLBackend:
        package = adapter is not None and Path(adapter).is_file()
        if adapter is not None and not package and not Path(adapter).is_dir():
            raise UsageError(f"adapter not found (a PEFT directory or a .tgsp package): {adapter}")
        backend = self.registry.ml_backend(self.config.backend)
        # Inference never trains, so the model is loaded without the DP-SGD machinery.
        backend.initialize_model(self.config.model_copy(update={"dp": DPConfig(enabled=False)}))
        if adapter is not None and package:
            with tempfile.TemporaryDirectory(prefix="tensafe-adapter-") as scratch:
                self._open_package(Path(adapter), Path(scratch) / "adapter", self.allow_untrusted_signer)
                backend.load_adapter(Path(scratch) / "adapter")
        elif adapter is not None:
            backend.load_adapter(Path(adapter))
        return backend

    def stream(self, prompt: str, *, adapter: Path | None = None) -> Iterator[str]:
        """Generated text as it comes (whole, for backends without streaming).

        The backend is resolved and loaded before this returns, so errors surface
        before the first piece of text.
        """
        backend = self._inference_backend(adapter)
        self.audit("inference.generate", self.config.backend, prompts=1, adapter=str(adapter or ""))
        if capabilities.has(backend, capabilities.STREAMING):
            return backend.sample_stream(backend.encode(prompt), self.config.sampling)
        return iter([self.sample_text(backend, [prompt], self.config.sampling)[0].sequences[0].text])

    def generate(
        self,
        prompts: Sequence[str],
        *,
        adapter: Path | None = None,
        sampling: SamplingParams | None = None,
        num_samples: int = 1,
    ) -> list[SampleResponse]:
        """Generate from the configured base model, with ``adapter`` (a directory) if given."""
        backend = self._inference_backend(adapter)
        self.audit("inference.generate", self.config.backend, prompts=len(prompts), adapter=str(adapter or ""))
        return self.sample_text(backend, prompts, sampling or self.config.sampling, num_samples)

    def run(
        self,
        *,
        run_dir: Path | None = None,
        evaluate: bool = True,
        prepared: TrainingRun | None = None,
        resume: bool = False,
    ) -> dict[str, Any]:
        """Train, export the adapter, and write checkpoints and the report into a run directory.

        With ``evaluate`` (``tensafe run``), also measure held-out loss and sample
        completions before and after training; without it (``tensafe train``),
        only train. ``prepared`` is a run from :meth:`prepare`, if already made.
        With ``resume``, continue from the checkpoint in ``run_dir`` up to
        ``training.steps`` steps. A checkpoint (backend state and privacy spend
        together) is written every ``training.checkpoint_every`` steps, at the
        end, and when the run fails, so nothing is lost.
        """
        started = time.time()
        run = prepared if prepared is not None else self.prepare()
        cfg = run.config
        if run_dir is None:
            if resume:
                raise UsageError("resuming needs the run directory to resume from")
            run_dir = cfg.output_dir / (cfg.run_name or time.strftime("run-%Y%m%d-%H%M%S-") + run.run_id[:6])
        checkpoint = run_dir / CHECKPOINT_DIR
        if resume and run.step == 0:
            self.load_checkpoint(run, checkpoint)
        elif checkpoint.exists():
            raise UsageError(f"{run_dir} already holds a run; resume it or choose another run name")
        run_dir.mkdir(parents=True, exist_ok=True)
        report: dict[str, Any] = {"run_id": run.run_id, "status": "failed", "run_dir": str(run_dir)}
        self.pm.hook.tensafe_start_run(run_id=run.run_id, config=run.config)
        self.audit("run.start", run.run_id, backend=cfg.backend, steps=cfg.training.steps, resumed_at=run.step)
        every = cfg.training.checkpoint_every
        try:
            prompts = self._eval_prompts(run) if evaluate else []
            probe = (run.eval_data or run.train_data)[:1]
            probe_before = self._probe(run, probe)
            start_step = run.step
            before = self.held_out_loss(run) if evaluate else None
            samples_before = self.sample_text(run.backend, prompts, cfg.sampling) if prompts else []
            while run.step < cfg.training.steps:
                self.train_step(run)
                if cfg.training.eval_every and run.step % cfg.training.eval_every == 0:
                    run.history[-1]["held_out_loss"] = self.held_out_loss(run) or math.nan
                if every and run.step % every == 0 and run.step < cfg.training.steps:
                    self.save_checkpoint(run, checkpoint)
            self.save_checkpoint(run, checkpoint)
            change = self._adapter_change(probe_before, self._probe(run, probe), run.step > start_step)
            after = self.held_out_loss(run) if evaluate else None
            samples_after = self.sample_text(run.backend, prompts, cfg.sampling) if prompts else []
            files = run.backend.export_adapter(run_dir / "adapter")
            package = self._package(run, run_dir) if self._packaging() else None
            report.update(
                status="completed",
                backend=cfg.backend,
                model=cfg.model.path or "embedded default",
                data=str(cfg.data.path or run.backend.default_dataset()),
                records={"train": len(run.train_data), "eval": len(run.eval_data)},
                steps=run.step,
                adapter_change=change,
                held_out_loss={"before": before, "after": after} if evaluate else None,
                privacy=run.privacy.certificate() if run.privacy else None,
                history=run.history,
                samples=[
                    {"prompt": p, "before": b.sequences[0].text, "after": a.sequences[0].text}
                    for p, b, a in zip(prompts, samples_before, samples_after, strict=True)
                ],
                adapter_files=[str(f) for f in files],
                package=package,
                checkpoint=str(checkpoint),
                config=json.loads(run.config.model_dump_json()),
                seconds=round(time.time() - started, 2),
            )
            self.audit("artifact.write", str(run_dir), files=[str(f) for f in files])
            return report
        except BaseException as exc:
            report.update(
                error=str(exc) or type(exc).__name__,
                steps=run.step,
                history=run.history,
                privacy=run.privacy.certificate() if run.privacy else None,
            )
            if run.step > 0:
                self.save_checkpoint(run, checkpoint)
                report["checkpoint"] = str(checkpoint)
            raise
        finally:
            (run_dir / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
            (run_dir / "report.txt").write_text(render_report(report), encoding="utf-8")
            self.pm.hook.tensafe_finish_run(run_id=run.run_id, report=report)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def render_report(report: dict[str, Any]) -> str:
    """A readable summary of a run report."""
    lines = [f"TenSafe run {report['run_id']}: {report['status']}"]
    if "error" in report:
        lines.append(f"  error: {report['error']}")
    for key in ("backend", "model", "data", "records", "steps", "seconds"):
        if key in report:
            lines.append(f"  {key}: {_fmt(report[key])}")
    loss = report.get("held_out_loss")
    if loss:
        lines.append(f"  held-out loss: {_fmt(loss['before'])} -> {_fmt(loss['after'])}")
    privacy = report.get("privacy")
    spent = [(int(h["step"]), h["epsilon"]) for h in report.get("history", []) if "epsilon" in h]
    if privacy and spent:
        count = min(REPORT_MARKS, len(spent))
        picks = sorted({round(i * (len(spent) - 1) / max(1, count - 1)) for i in range(count)})
        marks = [spent[i] for i in picks]
        lines.append("  epsilon by step: " + ", ".join(f"{step}: {eps:.3f}" for step, eps in marks))
    if privacy:
        lines.append(
            f"  privacy: epsilon {privacy['epsilon']:.4f} at delta {privacy['delta']:.3g} "
            f"({privacy['accountant']} accountant, {privacy['steps']} steps, q={privacy['sampling_rate']:.4g}, "
            f"sigma={privacy['noise_multiplier']:.4g})"
        )
    elif report.get("status") == "completed":
        lines.append("  privacy: NONE (trained without differential privacy)")
    for sample in report.get("samples", []):
        lines.append(f"  prompt: {sample['prompt']!r}")
        lines.append(f"    before: {sample['before']!r}")
        lines.append(f"    after:  {sample['after']!r}")
    return "\n".join(lines) + "\n"
