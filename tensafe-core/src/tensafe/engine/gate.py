"""Step admission and the release gate: what may run, and what may leave a run.

Every step is admitted here before it runs (the veto hooks, then the privacy
budget) and recorded here after it ran (the accountant is charged, then the
step is reported). Everything that leaves a run, whether progress display,
report, progress file, checkpoint history, audit event, hook call or
certificate, takes its values from :class:`ReleaseGate`, which knows the
privacy policy:

* without DP, everything is released as measured;
* under DP, a value computed from training records leaves only through an
  accounted mechanism (the trained adapter itself) or not at all: a step
  releases its number and the epsilon spent, never its loss, reward or
  realised batch size;
* a value computed from held-out records leaves labelled as outside the
  guarantee (the certificate lists it);
* record text leaves only from data declared public (``data.public``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tensafe.audit import AuditEvent
from tensafe.engine.run import PROBES_BACKEND, PROBES_CONFIGURED
from tensafe.errors import PrivacyBudgetExceeded, StepVetoed

if TYPE_CHECKING:
    from tensafe.config import RunConfig
    from tensafe.engine.ledger import PrivacyLedger
    from tensafe.engine.run import RunData, TrainingRun
    from tensafe.plugins import TensafePluginManager

#: Step metrics that say nothing about the training records beyond what the accountant charged.
PUBLIC_STEP_METRICS = frozenset({"epsilon", "epoch"})
#: Prefix of metrics computed from held-out records (outside the guarantee, released labelled).
HELD_OUT = "held_out_"
#: How many held-out prompts ``tensafe run`` shows when the data is declared public.
PUBLIC_SAMPLES = 3
#: What a budget refusal carries from the leader to the other workers.
BUDGET_FIELDS = ("epsilon", "delta", "steps", "target_epsilon", "would_be")
HELD_OUT_PROMPTS = "held-out records' prompts (data.public: the data is declared public)"


@dataclass(frozen=True)
class ReleaseGate:
    """The privacy policy of one run or session: what each kind of value may leave as."""

    private: bool
    public_data: bool = False

    @classmethod
    def for_config(cls, config: RunConfig) -> ReleaseGate:
        return cls(private=config.dp.enabled, public_data=config.data.public)

    def step_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """The part of a step's metrics that may leave the run."""
        if not self.private:
            return dict(metrics)
        return {k: v for k, v in metrics.items() if k in PUBLIC_STEP_METRICS or k.startswith(HELD_OUT)}

    def batch_size(self, realised: int, expected: int) -> int:
        """The batch size hooks see: under DP the expected one (a Poisson batch's size is private)."""
        return expected if self.private else realised

    def sample_prompts(self, data: RunData) -> tuple[list[str], str]:
        """Prompts whose completions are shown before and after training, and where they came from.

        Public probes when there are any; held-out prompts only when the data is
        declared public or the run makes no privacy claim.
        """
        if data.probes:
            return list(data.probes), data.probe_source
        if self.public_data or not self.private:
            prompts = [r.prompt for r in data.held_out if r.prompt][:PUBLIC_SAMPLES]
            return prompts, HELD_OUT_PROMPTS if self.public_data else "held-out records' prompts (no DP)"
        return [], ""

    def probe_text(self, data: RunData) -> str:
        """Public text whose logprobs show whether training changed the adapter at all."""
        return data.probes[0] if data.probes else "The quick brown fox jumps over the lazy dog."

    def outside_guarantee(self, data: RunData, *, evaluated: bool, measure: str, sample_source: str) -> list[str]:
        """Every release of a run that its certificate does not cover."""
        items = [
            f"the number of training records ({len(data.train)}): the sampling rate and the default delta "
            "are computed from it, as DP-SGD accounting assumes it public",
            "the run's wall-clock time (report.json 'seconds')",
        ]
        if evaluated and data.held_out:
            what = "held-out reward" if measure == "held_out_reward" else "held-out loss"
            items.append(
                f"{what} computed on {len(data.held_out)} held-out records of {data.held_out_source.name} "
                "(report.json 'held_out_records' lists their line numbers)"
            )
        if sample_source and sample_source not in (PROBES_CONFIGURED, PROBES_BACKEND):
            items.append(f"sample completions of {sample_source}")
        if self.public_data:
            items.append("record text: the training data was declared public (data.public)")
        return items


class StepGate:
    """Admits steps before they run and records them after, through the lifecycle hooks.

    In a run of several workers only the leader's gate (``leader``) asks the
    hooks and the budget, charges and releases; the others' gates learn each
    decision from it and release nothing.
    """

    def __init__(self, pm: TensafePluginManager, release: ReleaseGate, *, leader: bool = True) -> None:
        self.pm = pm
        self.release = release
        self.leader = leader

    def audit(self, operation: str, subject: str, **details: Any) -> None:
        if self.leader:
            self.pm.hook.tensafe_record_audit(event=AuditEvent(operation, subject, details))

    def admit(
        self,
        run_id: str,
        next_step: int,
        batch_size: int,
        privacy: PrivacyLedger | None,
        *,
        steps_taken: int | None = None,
    ) -> None:
        """Ask the veto hooks, then the privacy budget, whether the work ending at ``next_step`` may run.

        ``batch_size`` is what the hooks are shown (see :meth:`ReleaseGate.batch_size`);
        ``steps_taken`` (default ``next_step - 1``) is what a refusal reports as done.
        """
        reasons = [
            r for r in self.pm.hook.tensafe_approve_step(run_id=run_id, step=next_step, batch_size=batch_size) if r
        ]
        if reasons:
            raise StepVetoed(next_step, reasons)
        if privacy is not None:
            privacy.check_budget(next_step - 1 if steps_taken is None else steps_taken)

    def record(
        self, run_id: str, step: int, metrics: dict[str, float], privacy: PrivacyLedger | None
    ) -> dict[str, float]:
        """Charge the accountant for work that ran, then report, audit and warn; returns what was released.

        ``metrics`` gains the epsilon spent; hooks and the audit log see only
        the released part.
        """
        if privacy is not None:
            privacy.charge()
            metrics["epsilon"] = privacy.epsilon()
        released = self.release.step_metrics(metrics)
        self.pm.hook.tensafe_report_step(run_id=run_id, step=step, metrics=dict(released))
        self.audit("train.step", run_id, step=step, **released)
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
        return released

    def admit_batch(self, run: TrainingRun, next_step: int) -> list[int]:
        """Poisson-sample the next batch, if the step hooks and the privacy budget allow it.

        ``next_step`` is the optimizer step the batch's work will end at. A
        refused step leaves no trace, not even a drawn batch.
        """
        if run.workers is not None:
            return self._admit_shard(run, next_step)
        rng_before = rng_state(run.rng)
        indices = run.sampler.sample()
        shown = self.release.batch_size(len(indices), run.config.training.batch_size)
        try:
            self.admit(run.run_id, next_step, shown, run.privacy, steps_taken=run.step)
        except (StepVetoed, PrivacyBudgetExceeded):
            restore_rng(run.rng, rng_before)
            raise
        return indices

    def _admit_shard(self, run: TrainingRun, next_step: int) -> list[int]:
        """This worker's share of the step's global Poisson sample, once the leader admitted the step.

        The leader's decision reaches every worker before any of them runs the
        step: all run it, or none does. The sampler is keyed by step, so a
        refusal leaves nothing to undo.
        """
        assert run.workers is not None
        group = run.workers.group
        indices = run.workers.sampler.sample(next_step)
        realised = int(group.sum([float(len(indices))])[0])
        decision: dict[str, Any] = {"refused": None}
        if self.leader:
            shown = self.release.batch_size(realised, run.config.training.batch_size)
            try:
                self.admit(run.run_id, next_step, shown, run.privacy, steps_taken=run.step)
            except StepVetoed as exc:
                decision = {"refused": "vetoed", "reasons": exc.reasons}
            except PrivacyBudgetExceeded as exc:
                decision = {"refused": "budget", **{k: getattr(exc, k) for k in BUDGET_FIELDS}}
        decision = group.broadcast(decision)
        if decision["refused"] == "vetoed":
            raise StepVetoed(next_step, list(decision["reasons"]))
        if decision["refused"] == "budget":
            raise PrivacyBudgetExceeded(**{k: decision[k] for k in BUDGET_FIELDS})
        return indices

    def commit_step(self, run: TrainingRun, metrics: dict[str, float]) -> dict[str, float]:
        """Charge the spend of the batch just applied, record the step, and keep what was released.

        A worker other than the leader charges and releases nothing: the leader does it once for the step.
        """
        if not self.leader:
            return {}
        released = self.record(run.run_id, run.step, metrics, run.privacy)
        run.history.append({"step": float(run.step), **released})
        return released


def rng_state(rng: random.Random) -> list[Any] | None:
    """A seeded sampling RNG's state as JSON (None for the OS CSPRNG, which has none to save)."""
    if isinstance(rng, random.SystemRandom):
        return None
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def restore_rng(rng: random.Random, state: list[Any] | None) -> None:
    if state is not None and not isinstance(rng, random.SystemRandom):
        rng.setstate((state[0], tuple(state[1]), state[2]))
