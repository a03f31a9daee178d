"""The audit run: one DP training run of a copy of a config, with canaries in it, scored and judged.

Nothing of it reaches the user's run: it builds its own backend from the
config, trains it with the config's DP settings (backend, model, accountant,
target epsilon and delta, clipping norm, steps, expected batch size) and keeps
no checkpoint, adapter or report. Each canary is included independently with
probability 1/2 (the OS CSPRNG decides), then:

* **black-box** (any backend): the canaries are records of random words; the
  included ones join the training records and are Poisson-sampled like them.
  The sampling rate is fixed before the coin flips, from the training records
  plus half the canaries, so it says nothing about which canary is in. A
  canary's score is its loss per token before training minus after, through
  ``MLBackend.forward``.
* **white-box** (backends declaring ``gradient_canaries``): the canaries are
  Dirac gradients, each on its own trainable parameter, of norm
  ``CANARY_NORM * C``; every step each included canary is Poisson-sampled at
  the run's rate q and accumulated with ``forward_backward_canaries``, and
  every step's ``noised_gradient()`` is read (:class:`DiracObserver`). The
  copy trains on the canaries alone: the records would only add their own
  gradients to the canaries' coordinates, which blurs the test (up to several
  C per step at some coordinates of the embedded model) and costs most of the
  time, while the guarantee under test is the same for every dataset. The
  rate q and delta are those of the config's training records.

The number of guesses is fixed before training (``AuditSettings.guesses``,
a fifth of the canaries by default): half "included" for the highest scores,
half "excluded" for the lowest. The claimed epsilon is the audit run's own
ledger's, at its delta.
"""

from __future__ import annotations

import dataclasses
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tensafe import capabilities
from tensafe.auditing.canaries import canary_coordinates, canary_records, inclusion
from tensafe.auditing.scores import DiracObserver, mean_losses
from tensafe.auditing.verdict import judge, rank_guesses
from tensafe.data import PoissonSampler, Record, tokenize_record
from tensafe.engine import loop
from tensafe.engine.gate import ReleaseGate, StepGate
from tensafe.engine.ledger import AuditMode, AuditSummary, PrivacyLedger
from tensafe.engine.run import RunData, TrainingRun, load_run_data
from tensafe.errors import UsageError

if TYPE_CHECKING:
    from tensafe.config import RunConfig
    from tensafe.interfaces import MLBackend
    from tensafe.plugins import TensafePluginManager
    from tensafe.types import Datum

#: A white-box canary's norm in clipping norms: an honest backend clips it to C, one that does not lets it through.
CANARY_NORM = 10.0
#: Canaries of an audit unless told otherwise.
DEFAULT_CANARIES = 1000
#: Guesses are one canary in this many unless told otherwise.
GUESS_SHARE = 5

#: Called with the number of steps taken after each step.
Progress = Callable[[int], None]


@dataclass(frozen=True)
class AuditSettings:
    """What to audit with: the mode, the canaries m, the guesses k (fixed before training) and the confidence."""

    mode: AuditMode = "black-box"
    canaries: int = DEFAULT_CANARIES
    guesses: int | None = None
    confidence: float = 0.95

    @property
    def guess_count(self) -> int:
        return self.guesses if self.guesses is not None else max(2, self.canaries // GUESS_SHARE)

    def check(self) -> None:
        if self.canaries < 2:
            raise UsageError(f"an audit needs at least 2 canaries, got {self.canaries}")
        if not 1 <= self.guess_count <= self.canaries:
            raise UsageError(f"guesses must be between 1 and the {self.canaries} canaries, got {self.guess_count}")
        if not 0 < self.confidence < 1:
            raise UsageError(f"confidence must be in (0, 1), got {self.confidence}")


@dataclass(frozen=True)
class AuditOutcome:
    """The audit's summary, and the training records its copy was set up with (the run's protected set)."""

    summary: AuditSummary
    records: list[Record]


def audit(
    config: RunConfig, pm: TensafePluginManager, settings: AuditSettings, progress: Progress | None = None
) -> AuditOutcome:
    """Run the one-run audit of ``config``'s DP training and judge its claimed epsilon."""
    settings.check()
    if not config.dp.enabled:
        raise UsageError("dp.enabled is false: the config claims no epsilon, so there is nothing to audit")
    if config.mode != "sft":
        raise UsageError(f"the audit trains supervised runs (mode: sft); this config has mode: {config.mode}")
    backend = loop.training_backend(config, pm.registry)
    if settings.mode == "white-box":
        missing = [
            c for c in (capabilities.GRADIENT_CANARIES, capabilities.DP_PROBE) if not capabilities.has(backend, c)
        ]
        if missing:
            raise UsageError(
                f"a white-box audit needs an ML backend that declares {' and '.join(map(repr, missing))}; "
                f"{config.backend!r} does not (use --mode black-box, which works with any backend)"
            )
    data = load_run_data(config, backend)
    gate = StepGate(pm, ReleaseGate.for_config(config))
    run_mode = _white_box if settings.mode == "white-box" else _black_box
    summary = run_mode(config, gate, backend, data, settings, progress or (lambda _: None))
    return AuditOutcome(summary, data.train)


def _black_box(
    config: RunConfig,
    gate: StepGate,
    backend: MLBackend,
    data: RunData,
    settings: AuditSettings,
    progress: Progress,
) -> AuditSummary:
    """Canary records among the training records, scored by their loss before and after training."""
    canaries, included = canary_records(settings.canaries), inclusion(settings.canaries)
    config, ledger = _calibrate(config, gate, len(data.train) + settings.canaries // 2)
    info = backend.initialize_model(config)

    def tokenize(records: list[Record]) -> list[Datum]:
        return [tokenize_record(r, backend, info.eos_token_id, config.model.max_seq_len) for r in records]

    canary_data = tokenize(canaries)
    members = [r for r, s in zip(canaries, included, strict=True) if s]
    train_data = tokenize(data.train) + [d for d, s in zip(canary_data, included, strict=True) if s]
    rng = random.SystemRandom()
    run = TrainingRun(
        run_id=_run_id(),
        config=config,
        backend=backend,
        info=info,
        data=dataclasses.replace(data, train=data.train + members, held_out=[]),
        train_data=train_data,
        eval_data=[],
        sampler=PoissonSampler(len(train_data), ledger.sampling_rate, rng),
        rng=rng,
        privacy=ledger,
    )
    micro = config.training.micro_batch_size
    before = mean_losses(backend, canary_data, micro)
    while run.step < config.training.steps:
        loop.train_step(gate, run)
        progress(run.step)
    after = mean_losses(backend, canary_data, micro)
    scores = [b - a for b, a in zip(before, after, strict=True)]
    return _judge("black-box", scores, included, ledger, settings)


def _white_box(
    config: RunConfig,
    gate: StepGate,
    backend: MLBackend,
    data: RunData,
    settings: AuditSettings,
    progress: Progress,
) -> AuditSummary:
    """Dirac gradient canaries, Poisson-sampled at the records' rate, read from every step's noised gradient."""
    config, ledger = _calibrate(config, gate, len(data.train))
    info = backend.initialize_model(config)
    coordinates = canary_coordinates(settings.canaries, info.trainable_parameters)
    included = inclusion(settings.canaries)
    members = [c for c, s in zip(coordinates, included, strict=True) if s]
    dp, batch = config.dp, config.training.batch_size
    assert dp.noise_multiplier is not None  # calibrated
    observer = DiracObserver(
        coordinates,
        sampling_rate=ledger.sampling_rate,
        noise_multiplier=dp.noise_multiplier,
        unit=dp.max_grad_norm / batch,
    )
    rng, run_id = random.SystemRandom(), _run_id()
    for step in range(1, config.training.steps + 1):
        gate.admit(run_id, step, batch, ledger)
        sampled = [c for c in members if rng.random() < ledger.sampling_rate]
        if sampled:
            backend.forward_backward_canaries(sampled, CANARY_NORM * dp.max_grad_norm)
        backend.optim_step(config.optimizer)
        observer.observe(backend.noised_gradient())
        gate.record(run_id, step, {}, ledger)
        progress(step)
    return _judge("white-box", observer.scores, included, ledger, settings)


def _calibrate(config: RunConfig, gate: StepGate, records: int) -> tuple[RunConfig, PrivacyLedger]:
    config, ledger = loop.calibrate(config, gate.pm.registry, records)
    assert ledger is not None  # dp.enabled was checked
    return config, ledger


def _run_id() -> str:
    return "audit-" + uuid.uuid4().hex[:8]


def _judge(
    mode: AuditMode, scores: list[float], included: list[bool], ledger: PrivacyLedger, settings: AuditSettings
) -> AuditSummary:
    return judge(
        mode=mode,
        guesses=rank_guesses(scores, settings.guess_count),
        included=included,
        claimed_epsilon=ledger.epsilon(),
        delta=ledger.delta,
        accountant=ledger.accountant_name,
        steps=ledger.accountant.steps,
        confidence=settings.confidence,
    )
