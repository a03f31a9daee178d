"""The training loop: prepare a run, take steps on Poisson-sampled batches, and drive a whole run.

A step reads top to bottom: the gate admits a sampled batch, the backend does
the work in micro-batches, the gate charges the accountant and releases what
the policy allows. :func:`execute` is ``tensafe run`` / ``tensafe train``:
evaluation on held-out records and public probes before and after, periodic
checkpoints, the adapter, the optional package and the report.
"""

from __future__ import annotations

import math
import os
import random
import secrets
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tensafe import capabilities
from tensafe.data import PoissonSampler, Record, records_digest, tokenize_record, weight_total
from tensafe.engine.inference import sample_text
from tensafe.engine.ledger import PRIVACY_UNIT, ProtectedSet, build_ledger
from tensafe.engine.packaging import check_packaging, package_adapter, packaging_configured
from tensafe.engine.report import append_metrics, rewrite_metrics, write_report
from tensafe.engine.run import TrainingRun, load_run_data
from tensafe.engine.state import (
    CHECKPOINT_DIR,
    load_checkpoint,
    recover_checkpoint,
    save_checkpoint,
    saved_noise_multiplier,
)
from tensafe.engine.workers import ShardSampler, Workers
from tensafe.errors import BackendError, UsageError
from tensafe.types import datum_from_sequence

if TYPE_CHECKING:
    from tensafe.config import RunConfig
    from tensafe.engine.gate import StepGate
    from tensafe.engine.ledger import PrivacyLedger
    from tensafe.interfaces import MLBackend, WorkerGroup
    from tensafe.registry import Registry
    from tensafe.rl.loop import RLVRLoop
    from tensafe.types import Datum

#: The secret key of the protected set's digest, kept in the run directory with the data owner.
PROTECTED_SET_KEY = "protected-set.key"


def training_backend(config: RunConfig, registry: Registry) -> MLBackend:
    """The configured ML backend, refused if the config asks for DP it cannot do."""
    backend = registry.ml_backend(config.backend)
    if config.dp.enabled and not capabilities.has(backend, capabilities.DP_SGD):
        raise UsageError(
            f"ML backend {config.backend!r} does not implement DP-SGD; use a backend that does, "
            "or set dp.enabled: false (and give up every privacy claim)"
        )
    return backend


def calibrate(
    config: RunConfig, registry: Registry, n_train: int | None, declared_rate: float | None = None
) -> tuple[RunConfig, PrivacyLedger | None]:
    """The privacy ledger, and the config with the calibrated noise multiplier written into it."""
    privacy = build_ledger(config, registry, n_train, declared_rate)
    if privacy is not None and config.dp.noise_multiplier is None:
        dp = config.dp.model_copy(update={"noise_multiplier": privacy.update_noise_multiplier})
        config = config.model_copy(update={"dp": dp})
    return config, privacy


def rl_loop(config: RunConfig, registry: Registry, backend: MLBackend) -> RLVRLoop | None:
    """The RL loop for ``mode: rlvr``, its rewards resolved; None for supervised runs."""
    rl = config.rl
    if config.mode != "rlvr" or rl is None:
        return None
    from tensafe.rl.loop import RLVRLoop
    from tensafe.rl.rewards import resolve_rewards

    reward = resolve_rewards(registry, rl.rewards)
    if not capabilities.has(backend, capabilities.POLICY_LOSSES):
        raise UsageError(f"ML backend {config.backend!r} does not implement the policy losses that mode: rlvr needs")
    if config.dp.enabled and not capabilities.has(backend, capabilities.SEEDED_SAMPLING):
        raise UsageError(
            f"DP-RLVR needs each record's rollouts seeded on their own, and ML backend {config.backend!r} "
            "does not declare 'seeded_sampling'"
        )
    return RLVRLoop(rl, reward)


def join_workers(config: RunConfig, backend: MLBackend) -> WorkerGroup:
    """Join the run's other worker processes through the backend, refusing what cannot run on several."""
    if not capabilities.has(backend, capabilities.DISTRIBUTED):
        raise UsageError(f"ML backend {config.backend!r} cannot train on several workers (no 'distributed')")
    if config.mode == "rlvr":
        raise UsageError("mode: rlvr trains on one worker; leave out --nproc-per-node (and torchrun)")
    return backend.join_workers(config)


def prepare(
    config: RunConfig, registry: Registry, *, resume_from: Path | None = None, distributed: bool = False
) -> TrainingRun:
    """Resolve backends, load and split data, calibrate noise, load the model.

    With ``resume_from`` (a run directory), a config that leaves
    ``dp.noise_multiplier`` to calibration takes the one the run trained with,
    so the run can be resumed, and extended to more steps while the budget
    allows, at the noise it was calibrated with. With ``distributed``, this
    process is one of the workers a launcher started for the run (see
    :mod:`tensafe.engine.workers`); every worker calibrates the same noise.
    """
    if resume_from is not None and config.dp.enabled and config.dp.noise_multiplier is None:
        recover_checkpoint(resume_from / CHECKPOINT_DIR)
        saved = saved_noise_multiplier(resume_from / CHECKPOINT_DIR)
        if saved is not None:
            config = config.model_copy(update={"dp": config.dp.model_copy(update={"noise_multiplier": saved})})
    backend = training_backend(config, registry)
    group = join_workers(config, backend) if distributed else None
    check_packaging(config, registry)
    rl = rl_loop(config, registry, backend)  # rewards resolve before any data is read or sampled
    data = load_run_data(config, backend)
    if rl is not None and any(r.messages for r in (*data.train, *data.held_out)):
        raise UsageError("mode: rlvr takes prompt/completion records (the prompt is sampled), not chat records")
    config, privacy = calibrate(config, registry, len(data.train))
    if rl is not None:
        from tensafe.rl.privacy import backend_config, certificate_details

        if privacy is not None:
            privacy.statement.update(certificate_details(config, rl.config))
        info = backend.initialize_model(backend_config(config))
    else:
        info = backend.initialize_model(config)

    def tokenize(records: Sequence[Record]) -> list[Datum]:
        return [tokenize_record(r, backend, info.eos_token_id, config.model.max_seq_len) for r in records]

    secure = privacy is not None and config.dp.secure_rng
    rng = random.SystemRandom() if secure or config.training.seed is None else random.Random(config.training.seed)
    sampling_rate = privacy.sampling_rate if privacy else min(1.0, config.training.batch_size / len(data.train))
    workers = None
    if group is not None:
        seed = None if secure else config.training.seed
        shard = ShardSampler(len(data.train), sampling_rate, rank=group.rank, world_size=group.world_size, seed=seed)
        workers = Workers(group, shard)
    return TrainingRun(
        run_id=uuid.uuid4().hex[:12],
        config=config,
        backend=backend,
        info=info,
        data=data,
        train_data=tokenize(data.train),
        eval_data=tokenize(data.held_out),
        sampler=PoissonSampler(len(data.train), sampling_rate, rng),
        rng=rng,
        privacy=privacy,
        rl=rl,
        workers=workers,
    )


def held_out_loss(run: TrainingRun) -> float | None:
    """Mean cross-entropy per weighted token on the held-out records."""
    if not run.eval_data:
        return None
    total, tokens = 0.0, 0.0
    size = run.config.training.micro_batch_size
    for start in range(0, len(run.eval_data), size):
        out = run.backend.forward(run.eval_data[start : start + size], "cross_entropy")
        total += out.metrics["loss:sum"]
        tokens += weight_total(run.eval_data[start : start + size])
    return total / tokens if tokens else None


def held_out(run: TrainingRun) -> tuple[str, float | None]:
    """The run's held-out measure: mean reward for RLVR runs, cross-entropy loss otherwise."""
    if run.rl is not None:
        return "held_out_reward", run.rl.held_out_reward(run.backend, run.eval_records)
    return "held_out_loss", held_out_loss(run)


def train_step(gate: StepGate, run: TrainingRun) -> dict[str, float]:
    """One step on a Poisson-sampled batch, within the privacy budget (an RL step for ``mode: rlvr``).

    Returns the step's released metrics.
    """
    if run.rl is not None:
        return run.rl.train_step(gate, run)
    cfg = run.config
    indices = gate.admit_batch(run, run.step + 1)
    batch = [run.train_data[i] for i in indices]
    loss_sum, tokens = 0.0, 0.0
    size = cfg.training.micro_batch_size
    for start in range(0, len(batch), size):
        micro = batch[start : start + size]
        out = run.backend.forward_backward(micro, "cross_entropy")
        loss_sum += out.metrics["loss:sum"]
        tokens += weight_total(micro)
    size_sum = float(len(batch))
    if run.workers is not None:  # the step's measures over the global batch
        loss_sum, tokens, size_sum = run.workers.group.sum([loss_sum, tokens, size_sum])
    result = run.backend.optim_step(cfg.optimizer)
    run.step = result.step
    metrics: dict[str, float] = {"batch_size": size_sum, "loss": loss_sum / tokens if tokens else math.nan}
    metrics.update({k: v for k, v in result.metrics.items() if k not in metrics})
    return gate.commit_step(run, metrics)


def _probe_logprobs(run: TrainingRun, probe: Datum) -> list[float]:
    return list(run.backend.forward([probe], "cross_entropy").loss_fn_outputs[0]["logprobs"])


def _adapter_change(before: list[float], after: list[float], trained: bool) -> float:
    """Largest change of a public probe's logprob; refuses a run whose adapter did not change at all.

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


def _protected_set_key(run_dir: Path) -> bytes:
    """The run's secret digest key: made once, readable by the owner only, reused on resume."""
    path = run_dir / PROTECTED_SET_KEY
    if not path.is_file():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(secrets.token_bytes(32))
    return path.read_bytes()


def _certify(gate: StepGate, run: TrainingRun, run_dir: Path, *, evaluated: bool, sample_source: str) -> None:
    """Fill the run's certificate statement: the unit, the protected set and every release outside it."""
    if run.privacy is None:
        return
    measure = "held_out_reward" if run.rl is not None else "held_out_loss"
    protected = ProtectedSet(
        records=len(run.data.train),
        digest=records_digest(run.data.train, _protected_set_key(run_dir)),
        source=run.data.source.name,
    )
    run.privacy.statement.setdefault("privacy_unit", PRIVACY_UNIT)
    run.privacy.statement.update(
        mode=run.config.mode,
        protected_set=protected,
        outside_guarantee=gate.release.outside_guarantee(
            run.data, evaluated=evaluated, measure=measure, sample_source=sample_source
        ),
    )


def execute(
    gate: StepGate, registry: Registry, run: TrainingRun, run_dir: Path, *, evaluate: bool, resume: bool
) -> dict[str, Any]:
    """Train, export the adapter, and write checkpoints and the report into ``run_dir``.

    With ``evaluate`` (``tensafe run``), also measure the held-out set and sample
    public probes before and after training. With ``resume``, continue from the
    checkpoint in ``run_dir`` up to ``training.steps``. A checkpoint is written
    every ``training.checkpoint_every`` steps, at the end, and when the run
    fails, so nothing is lost.
    """
    if not run.leader:
        return follow(gate, run, run_dir, resume=resume)
    started = time.time()
    cfg = run.config
    checkpoint = run_dir / CHECKPOINT_DIR
    if resume:
        if run.step == 0:  # not yet loaded by the caller
            load_checkpoint(gate, run, checkpoint)
    elif checkpoint.exists():
        raise UsageError(f"{run_dir} already holds a run; resume it (--resume) or choose another run name")
    run_dir.mkdir(parents=True, exist_ok=True)
    rewrite_metrics(run_dir, run.history)
    report: dict[str, Any] = {"run_id": run.run_id, "status": "failed", "run_dir": str(run_dir)}
    prompts, sample_source = gate.release.sample_prompts(run.data) if evaluate else ([], "")
    evaluated = evaluate or bool(cfg.training.eval_every)
    _certify(gate, run, run_dir, evaluated=evaluated, sample_source=sample_source if prompts else "")
    gate.pm.hook.tensafe_start_run(run_id=run.run_id, config=run.config)
    gate.audit("run.start", run.run_id, backend=cfg.backend, steps=cfg.training.steps, resumed_at=run.step)
    every = cfg.training.checkpoint_every
    try:
        probe = datum_from_sequence(run.backend.encode(gate.release.probe_text(run.data)), prompt_length=0)
        probe_before = _probe_logprobs(run, probe)
        start_step = run.step
        measure, before = held_out(run) if evaluate else ("held_out_loss", None)
        samples_before = sample_text(run.backend, prompts, cfg.sampling) if prompts else []
        while run.step < cfg.training.steps:
            train_step(gate, run)
            if cfg.training.eval_every and run.step % cfg.training.eval_every == 0:
                key, value = held_out(run)
                if value is not None:
                    run.history[-1][key] = value
            append_metrics(run_dir, run.history[-1])
            if every and run.step % every == 0 and run.step < cfg.training.steps:
                save_checkpoint(gate, run, checkpoint)
        save_checkpoint(gate, run, checkpoint)
        # An RL run whose rewards never varied within a group has nothing to learn from: no change is expected.
        signal = run.rl is None or run.rl.had_signal or run.privacy is not None
        change = _adapter_change(probe_before, _probe_logprobs(run, probe), run.step > start_step and signal)
        after = held_out(run)[1] if evaluate else None
        samples_after = sample_text(run.backend, prompts, cfg.sampling) if prompts else []
        files = run.backend.export_adapter(run_dir / "adapter")
        certificate = run.privacy.certificate() if run.privacy else None
        package = None
        if packaging_configured(cfg):
            assert cfg.tgsp is not None
            output = cfg.tgsp.output or run_dir / "adapter.tgsp"
            package = package_adapter(gate, registry, cfg, run_dir / "adapter", output, certificate)
        report.update(
            status="completed",
            backend=cfg.backend,
            model=cfg.model.path or "embedded default",
            device=run.info.device or "not reported by the backend",
            dtype=run.info.dtype or cfg.model.dtype,
            workers=run.workers.group.world_size if run.workers is not None else 1,
            data=str(run.data.source),
            records={"train": len(run.train_data), "eval": len(run.eval_data)},
            held_out_records=[r.line for r in run.data.held_out],
            steps=run.step,
            adapter_change=change,
            mode=cfg.mode,
            **{measure: {"before": before, "after": after} if evaluate else None},
            privacy=certificate.to_json() if certificate else None,
            history=run.history,
            sample_prompts=sample_source,
            samples=[
                {"prompt": p, "before": b.sequences[0].text, "after": a.sequences[0].text}
                for p, b, a in zip(prompts, samples_before, samples_after, strict=True)
            ],
            adapter_files=[str(f) for f in files],
            package=package,
            checkpoint=str(checkpoint),
            config=cfg.model_dump(mode="json"),
            seconds=round(time.time() - started, 2),
        )
        gate.audit("artifact.write", str(run_dir), files=[str(f) for f in files])
        return report
    except BaseException as exc:
        report.update(
            error=str(exc) or type(exc).__name__,
            steps=run.step,
            history=run.history,
            privacy=run.privacy.certificate().to_json() if run.privacy else None,
        )
        if run.step > 0:
            save_checkpoint(gate, run, checkpoint)
            report["checkpoint"] = str(checkpoint)
        raise
    finally:
        write_report(run_dir, report)
        gate.pm.hook.tensafe_finish_run(run_id=run.run_id, report=report)


def follow(gate: StepGate, run: TrainingRun, run_dir: Path, *, resume: bool) -> dict[str, Any]:
    """A worker other than the leader: the same steps on its shard, and nothing written or released.

    The leader evaluates, checkpoints and exports; the workers hold the same
    state after every step, so a resume at any world size starts from the leader's checkpoint.
    """
    if resume and run.step == 0:
        load_checkpoint(gate, run, run_dir / CHECKPOINT_DIR)
    while run.step < run.config.training.steps:
        train_step(gate, run)
    return {"run_id": run.run_id, "status": "completed", "run_dir": str(run_dir), "steps": run.step}
