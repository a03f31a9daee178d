"""The orchestrator: the one place that turns a configuration into work.

The CLI, the SDK and the HTTP server all call it. It resolves backends from the
registry (never falling back to something weaker), samples batches with Poisson
sampling, charges the privacy accountant for every optimizer step and refuses a
step that would exceed the budget, drives the lifecycle hooks, and writes the
run's artifacts and report.
"""

from __future__ import annotations

import contextlib
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
from tensafe.config import DPConfig, HEConfig, RunConfig
from tensafe.data import PoissonSampler, Record, load_records, split_records, tokenize_record
from tensafe.errors import BackendError, PrivacyBudgetExceeded, StepVetoed, UsageError
from tensafe.plugins import TensafePluginManager, create_plugin_manager

if TYPE_CHECKING:
    from tensafe.he_lora import Evaluator
    from tensafe.interfaces import HEBackend, MLBackend, PrivacyAccountant
    from tensafe.registry import Registry
    from tensafe.rl.loop import RLVRLoop
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
    #: Optimizer steps covered by one charge (PPO epochs on one sample; see tensafe.rl.privacy).
    updates_per_charge: int = 1
    #: Noise multiplier of each optimizer step; ``noise_multiplier`` is what one charge is accounted at.
    update_noise_multiplier: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)
    warned: bool = False
    sampling: str = SAMPLING_BY_ORCHESTRATOR

    def charge(self) -> None:
        """Account for one sampled batch (``updates_per_charge`` optimizer steps)."""
        self.accountant.compose_step(self.sampling_rate, self.noise_multiplier)

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
            **self.details,
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
    train_records: list[Record] = field(default_factory=list)
    #: The RL loop and its state, for ``mode: rlvr``.
    rl: RLVRLoop | None = None
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
        from tensafe.rl.privacy import charged_noise_multiplier, update_noise_multiplier

        updates = self.config.rl.epochs if self.config.rl is not None else 1
        if dp.noise_multiplier is None:
            assert dp.target_epsilon is not None  # guaranteed by DPConfig
            charges = training.steps // updates
            charged = accountant.calibrate_noise_multiplier(dp.target_epsilon, delta, sampling_rate, charges)
            sigma = update_noise_multiplier(charged, updates)
        else:
            sigma, charged = dp.noise_multiplier, charged_noise_multiplier(dp.noise_multiplier, updates)
        return PrivacyLedger(
            dp.accountant,
            accountant,
            sampling_rate,
            charged,
            delta,
            dp.target_epsilon,
            dp.warn_fraction,
            dp.secure_rng,
            updates_per_charge=updates,
            update_noise_multiplier=sigma,
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
            dp = self.config.dp.model_copy(update={"noise_multiplier": privacy.update_noise_multiplier})
            self.config = self.config.model_copy(update={"dp": dp})
        return privacy

    def prepare(self) -> TrainingRun:
        """Resolve backends, load and split data, calibrate noise, load the model."""
        backend = self.training_backend()
        self._check_packaging()
        rl = self._rl_loop(backend)  # rewards resolve before any data is read or sampled
        train_records, eval_records = split_records(self._records(backend), self.config.data.eval_fraction)
        privacy = self.calibrated_privacy(len(train_records))
        cfg = self.config
        if rl is not None:
            from tensafe.rl.privacy import backend_config, certificate_details

            if privacy is not None:
                privacy.details = certificate_details(cfg, rl.config)
            info = backend.initialize_model(backend_config(cfg))
        else:
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
            train_records=train_records,
            rl=rl,
        )

    def _rl_loop(self, backend: MLBackend) -> RLVRLoop | None:
        """The RL loop for ``mode: rlvr``, its rewards resolved; None for supervised runs."""
        rl = self.config.rl
        if self.config.mode != "rlvr" or rl is None:
            return None
        from tensafe.rl.loop import RLVRLoop
        from tensafe.rl.rewards import resolve_rewards

        reward = resolve_rewards(self.registry, rl.rewards)
        if not capabilities.has(backend, capabilities.POLICY_LOSSES):
            raise UsageError(
                f"ML backend {self.config.backend!r} does not implement the policy losses that mode: rlvr needs"
            )
        return RLVRLoop(rl, reward)

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

    def admit_step(
        self,
        run_id: str,
        next_step: int,
        batch_size: int,
        privacy: PrivacyLedger | None,
        *,
        steps_taken: int | None = None,
    ) -> None:
        """Ask the veto hooks, then the privacy budget, whether the work ending at ``next_step`` may run.

        ``steps_taken`` (default ``next_step - 1``) is what a refusal reports as done.
        """
        reasons = [
            r for r in self.pm.hook.tensafe_approve_step(run_id=run_id, step=next_step, batch_size=batch_size) if r
        ]
        if reasons:
            raise StepVetoed(next_step, reasons)
        if privacy is not None:
            privacy.check_budget(next_step - 1 if steps_taken is None else steps_taken)

    def record_step(self, run_id: str, step: int, metrics: dict[str, float], privacy: PrivacyLedger | None) -> None:
        """Charge the accountant for work that ran, then report, audit and warn about it."""
        if privacy is not None:
            privacy.charge()
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

    def admit_batch(self, run: TrainingRun, next_step: int) -> list[int]:
        """Poisson-sample the next batch, if the step hooks and the privacy budget allow it.

        ``next_step`` is the optimizer step the batch's work will end at. A
        refused step leaves no trace, not even a drawn batch.
        """
        rng_before = _rng_state(run.rng)
        indices = run.sampler.sample()
        try:
            self.admit_step(run.run_id, next_step, len(indices), run.privacy, steps_taken=run.step)
        except (StepVetoed, PrivacyBudgetExceeded):
            _restore_rng(run.rng, rng_before)
            raise
        return indices

    def held_out(self, run: TrainingRun) -> tuple[str, float | None]:
        """The run's held-out measure: mean reward for RLVR runs, cross-entropy loss otherwise."""
        if run.rl is not None:
            return "held_out_reward", run.rl.held_out_reward(run.backend, run.eval_records)
        return "held_out_loss", self.held_out_loss(run)

    def train_step(self, run: TrainingRun) -> dict[str, float]:
        """One step on a Poisson-sampled batch, within the privacy budget (an RL step for ``mode: rlvr``)."""
        if run.rl is not None:
            return run.rl.train_step(self, run)
        cfg = run.config
        indices = self.admit_batch(run, run.step + 1)
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
        return self.commit_step(run, metrics)

    def commit_step(self, run: TrainingRun, metrics: dict[str, float]) -> dict[str, float]:
        """Charge the privacy spend of the batch just applied, then record and report the step."""
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
            "rl": run.rl.state() if run.rl else None,
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
            accounted = run.privacy.accountant.steps * run.privacy.updates_per_charge
            if accounted != step:
                raise UsageError(f"checkpoint is torn: {accounted} steps accounted, {step} taken")
        if run.rl is not None:
            run.rl.restore(progress.get("rl"))
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
        return self._load_for_inference(adapter, he=False)[0]

    def _load_for_inference(self, adapter: Path | None, *, he: bool) -> tuple[MLBackend, Evaluator | None]:
        """The loaded ML backend, and with ``he`` the HE-LoRA evaluator whose deltas replace the adapter's."""
        package = adapter is not None and Path(adapter).is_file()
        if adapter is not None and not package and not Path(adapter).is_dir():
            raise UsageError(f"adapter not found (a PEFT directory or a .tgsp package): {adapter}")
        if he and adapter is None:
            raise UsageError("HE inference needs an adapter (a PEFT directory or a .tgsp package) to encrypt")
        backend = self.registry.ml_backend(self.config.backend)
        if he and not capabilities.has(backend, capabilities.LORA_DELTA):
            raise UsageError(f"ML backend {self.config.backend!r} cannot take LoRA deltas from HE (no 'lora_delta')")
        he_config = self.config.he or HEConfig()
        if he:
            self.registry.registration("he_backend", he_config.backend)  # fail before loading the model
        # Inference never trains, so the model is loaded without the DP-SGD machinery.
        backend.initialize_model(self.config.model_copy(update={"dp": DPConfig(enabled=False)}))
        evaluator = None
        if adapter is not None and package:
            with tempfile.TemporaryDirectory(prefix="tensafe-adapter-") as scratch:
                opened = Path(scratch) / "adapter"
                manifest = self._open_package(Path(adapter), opened, self.allow_untrusted_signer)
                marker = manifest.get("encrypted_adapter")
                if he:
                    evaluator = self._he_evaluator(backend, opened, marker)
                elif marker is not None:
                    raise UsageError("this package's adapter is HE-encrypted; run inference with HE (--he)")
                else:
                    backend.load_adapter(opened)
        elif adapter is not None and he:
            evaluator = self._he_evaluator(backend, Path(adapter), None)
        elif adapter is not None:
            backend.load_adapter(Path(adapter))
        return backend, evaluator

    def _he_evaluator(self, backend: MLBackend, directory: Path, marker: Any) -> Evaluator:
        """An in-process key owner and evaluator for the adapter in ``directory``.

        An HE-encrypted adapter (``marker`` from the package's manifest) is opened with
        the key owner's saved state (``he.key_owner_state``); a plaintext adapter is
        read by the key owner and encrypted under fresh keys.
        """
        from tensafe import he_lora

        he_config = self.config.he or HEConfig()

        def make() -> HEBackend:
            return self.registry.he_backend(he_config.backend)

        if marker is None:
            return he_lora.in_process(make, he_config, backend.read_lora(directory))[1]
        if not isinstance(marker, dict) or marker.get("protocol") != he_lora.PROTOCOL:
            raise UsageError(f"the package's encrypted adapter uses an unknown protocol: {marker!r}")
        if marker.get("he_backend") != he_config.backend:
            raise UsageError(f"the package's adapter is encrypted for HE backend {marker.get('he_backend')!r}")
        if he_config.key_owner_state is None or not he_config.key_owner_state.is_file():
            raise UsageError(
                "opening an HE-encrypted adapter in process needs the key owner's state file (he.key_owner_state)"
            )
        adapter_file = directory / he_lora.ENCRYPTED_ADAPTER_FILE
        if not adapter_file.is_file():
            raise UsageError(f"the package has no {he_lora.ENCRYPTED_ADAPTER_FILE}")
        return he_lora.open_encrypted(make, adapter_file.read_bytes(), he_config.key_owner_state.read_bytes())

    def stream(self, prompt: str, *, adapter: Path | None = None, he: bool = False) -> Iterator[str]:
        """Generated text as it comes (whole, for backends without streaming).

        The backend is resolved and loaded before this returns, so errors surface
        before the first piece of text. With ``he``, the adapter's arithmetic runs
        under homomorphic encryption (HE-LoRA).
        """
        backend, evaluator = self._load_for_inference(adapter, he=he)
        self.audit("inference.generate", self.config.backend, prompts=1, adapter=str(adapter or ""), he=he)
        stack = contextlib.ExitStack()
        if evaluator is not None:
            stack.enter_context(backend.lora_delta(evaluator.modules, evaluator.delta))
        if capabilities.has(backend, capabilities.STREAMING):
            pieces = backend.sample_stream(backend.encode(prompt), self.config.sampling)
        else:
            with stack:
                return iter([self.sample_text(backend, [prompt], self.config.sampling)[0].sequences[0].text])
        return _closing(pieces, stack)

    def generate(
        self,
        prompts: Sequence[str],
        *,
        adapter: Path | None = None,
        sampling: SamplingParams | None = None,
        num_samples: int = 1,
        he: bool = False,
    ) -> list[SampleResponse]:
        """Generate from the configured base model, with ``adapter`` (a directory or package) if given.

        With ``he``, the adapter's arithmetic runs under homomorphic encryption (HE-LoRA).
        """
        backend, evaluator = self._load_for_inference(adapter, he=he)
        self.audit("inference.generate", self.config.backend, prompts=len(prompts), adapter=str(adapter or ""), he=he)
        with contextlib.ExitStack() as stack:
            if evaluator is not None:
                stack.enter_context(backend.lora_delta(evaluator.modules, evaluator.delta))
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
            measure, before = self.held_out(run) if evaluate else ("held_out_loss", None)
            samples_before = self.sample_text(run.backend, prompts, cfg.sampling) if prompts else []
            while run.step < cfg.training.steps:
                self.train_step(run)
                if cfg.training.eval_every and run.step % cfg.training.eval_every == 0:
                    key, value = self.held_out(run)
                    run.history[-1][key] = math.nan if value is None else value
                if every and run.step % every == 0 and run.step < cfg.training.steps:
                    self.save_checkpoint(run, checkpoint)
            self.save_checkpoint(run, checkpoint)
            # An RL run whose rewards never varied within a group has nothing to learn from: no change is expected.
            signal = run.rl is None or run.rl.had_signal or run.privacy is not None
            change = self._adapter_change(probe_before, self._probe(run, probe), run.step > start_step and signal)
            after = self.held_out(run)[1] if evaluate else None
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
                mode=cfg.mode,
                **{measure: {"before": before, "after": after} if evaluate else None},
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


def _closing(pieces: Iterator[str], stack: contextlib.ExitStack) -> Iterator[str]:
    """Yield ``pieces``, then leave ``stack`` (also when the consumer stops early)."""
    with stack:
        yield from pieces


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _marks(points: list[tuple[int, float]], count: int = REPORT_MARKS) -> list[tuple[int, float]]:
    """At most ``count`` evenly spread points of a curve, first and last included."""
    count = min(count, len(points))
    picks = sorted({round(i * (len(points) - 1) / max(1, count - 1)) for i in range(count)})
    return [points[i] for i in picks]


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
    reward = report.get("held_out_reward")
    if reward:
        lines.append(f"  held-out reward: {_fmt(reward['before'])} -> {_fmt(reward['after'])}")
    history = report.get("history", [])
    for key, label in (("held_out_reward", "held-out reward by step"), ("reward", "rollout reward by step")):
        curve = [(int(h["step"]), h[key]) for h in history if key in h]
        if curve:
            lines.append(f"  {label}: " + ", ".join(f"{step}: {value:.3f}" for step, value in _marks(curve)))
    privacy = report.get("privacy")
    spent = [(int(h["step"]), h["epsilon"]) for h in history if "epsilon" in h]
    if privacy and spent:
        lines.append("  epsilon by step: " + ", ".join(f"{step}: {eps:.3f}" for step, eps in _marks(spent)))
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
