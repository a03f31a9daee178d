"""The privacy spend of a run or session, and the certificate that states it.

:class:`PrivacyCertificate` is the one typed statement of a guarantee: run
reports, session answers and TGSP packages all carry it, and TGSP validates a
package's certificate with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tensafe.errors import PrivacyBudgetExceeded, UsageError

if TYPE_CHECKING:
    from tensafe.config import RunConfig
    from tensafe.interfaces import PrivacyAccountant
    from tensafe.registry import Registry

#: How the certificate describes the sampling its epsilon assumes.
SAMPLING_BY_ENGINE = "poisson, by the engine over the training records"
SAMPLING_BY_SERVER = "poisson, by the server over the dataset uploaded to it (the caller supplied no batches)"
SAMPLING_DECLARED = (
    "poisson at a rate declared by the caller, who supplied the batches (an assumption, not a guarantee)"
)
RANDOMNESS_SECURE = (
    "os-csprng: noise seeded from the operating system's CSPRNG at every start; its state is never saved"
)
RANDOMNESS_SEEDED = "seeded from training.seed: reproducible, NOT private (whoever knows the seed can remove the noise)"
RANDOMNESS_SECURE_MODE = RANDOMNESS_SECURE + "; Opacus secure mode (summed Gaussian draws)"
#: The privacy unit of runs and sessions: what one neighbouring dataset adds or removes.
PRIVACY_UNIT = "one JSONL record of the training file"
PRIVACY_UNIT_DATASET = "one JSONL record of the uploaded dataset"
PRIVACY_UNIT_SESSION = "one record of the caller's dataset, contributing at most one datum per step"
CALLER_DUTIES = (
    "draw each step's batch by Poisson sampling at the declared sampling_rate, independently of past results",
    "let each record contribute at most one datum to a step (unless the certificate says otherwise)",
    "count dataset_size as the records the rate applies to",
    "call optim_step once for every batch drawn, an empty one included (the step is then noise only)",
)


class ProtectedSet(BaseModel):
    """The records the guarantee covers: how many, and a digest that identifies them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    records: int = Field(ge=0, description="Training records the guarantee covers.")
    digest: str = Field(
        description="HMAC-SHA256 of the training records' canonical JSON, in file order, under a secret key "
        "that stays with the data (protected-set.key in the run directory)."
    )
    source: str | None = Field(None, description="The data file the records came from.")


#: An audit's verdicts: its lower bound is at most the claimed epsilon, or above it.
AUDIT_CONSISTENT = "consistent"
AUDIT_VIOLATION = "VIOLATION: lower bound exceeds the claimed epsilon"
AuditVerdict = Literal["consistent", "VIOLATION: lower bound exceeds the claimed epsilon"]
#: black-box: canary records scored by their loss; white-box: gradient canaries read from every step's noised gradient.
AuditMode = Literal["black-box", "white-box"]


class AuditSummary(BaseModel):
    """An empirical privacy audit: a lower bound on epsilon measured from one training run with canaries.

    The one-run audit of Steinke, Nasr and Jagielski (NeurIPS 2023), run by
    ``tensafe privacy audit`` (:mod:`tensafe.auditing`) on a copy of a run's
    settings. An (epsilon, delta)-DP implementation yields a lower bound above
    its epsilon with probability at most ``1 - confidence``; the verdict says
    whether this one did.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: AuditMode = Field(
        description="black-box: canary records scored by their loss; white-box: gradient canaries read from the "
        "noised gradient of every step."
    )
    accountant: str = Field(min_length=1, description="Accountant of the audit run, which claimed the epsilon.")
    claimed_epsilon: float = Field(ge=0, description="Epsilon the audit run's accountant charged, at delta.")
    delta: float = Field(ge=0, le=1, description="delta of the claim and of the lower bound.")
    steps: int = Field(ge=0, description="Steps of the audit run.")
    epsilon_lower_bound: float = Field(ge=0, description="Empirical lower bound on epsilon at delta.")
    confidence: float = Field(gt=0, lt=1, description="Probability with which the lower bound holds.")
    canaries: int = Field(ge=1, description="m: canaries, each included independently with probability 1/2.")
    guesses: int = Field(ge=0, description="k: canaries whose membership was guessed; the rest were abstained on.")
    correct: int = Field(ge=0, description="Guesses that were right.")
    ceiling: float = Field(ge=0, description="The bound had all m canaries been guessed right: the most m certify.")
    guesses_ceiling: float = Field(ge=0, description="The bound had all k guesses been right.")
    verdict: AuditVerdict = Field(description="Whether the lower bound exceeds the claimed epsilon.")

    @field_validator("claimed_epsilon", "delta", "epsilon_lower_bound", "ceiling", "guesses_ceiling")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> AuditSummary:
        if not self.correct <= self.guesses <= self.canaries:
            raise ValueError("need correct <= guesses <= canaries")
        violated = self.epsilon_lower_bound > self.claimed_epsilon
        if (self.verdict == AUDIT_VIOLATION) != violated:
            raise ValueError(f"verdict {self.verdict!r} contradicts the lower bound and the claimed epsilon")
        return self


class PrivacyCertificate(BaseModel):
    """What a DP-trained adapter's privacy guarantee is, and what lies outside it.

    Only ``accountant``, ``epsilon``, ``delta`` and ``steps`` are required, so
    packages made by other tools validate; runs and sessions fill the fields
    that apply to them. Unknown fields are kept (a later version may add some).
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    accountant: str = Field(min_length=1, description="Registered accountant that computed epsilon.")
    epsilon: float = Field(ge=0, description="Epsilon spent, at delta.")
    delta: float = Field(ge=0, le=1, description="delta of (epsilon, delta)-DP.")
    steps: int = Field(ge=0, description="Accountant charges (sampled batches) composed.")
    target_epsilon: float | None = Field(None, gt=0, description="The budget no step could cross.")
    sampling_rate: float | None = Field(None, gt=0, le=1, description="Poisson sampling rate q.")
    noise_multiplier: float | None = Field(None, gt=0, description="Noise multiplier each charge is accounted at.")
    max_grad_norm: float | None = Field(None, gt=0, description="Per-record clipping norm C.")
    neighbouring_relation: str = Field("add_or_remove_one", description="What neighbouring datasets differ by.")
    privacy_unit: str | None = Field(None, description="What one neighbouring record is.")
    sampling: str | None = Field(None, description="Who sampled the batches, and how.")
    randomness: str | None = Field(None, description="Where the noise came from; says 'NOT private' when seeded.")
    reproducible_noise: bool | None = Field(None, description="True when the noise was seeded (no guarantee).")
    mode: Literal["sft", "rlvr", "session"] | None = Field(None, description="Supervised run, RL run or session.")
    protected_set: ProtectedSet | None = Field(None, description="The training records the guarantee covers.")
    caller_duties: list[str] = Field(
        default_factory=list, description="What a caller who supplied batches must have done for epsilon to hold."
    )
    outside_guarantee: list[str] = Field(
        default_factory=list, description="Every release of the run that the guarantee does not cover."
    )
    audit_chain_head: str | None = Field(None, description="Head of the audit chain the spend was recorded in.")
    audited: AuditSummary | None = Field(
        None, description="An empirical privacy audit of the run's settings (tensafe privacy audit --run-dir)."
    )

    @field_validator("epsilon", "delta", "target_epsilon", "sampling_rate", "noise_multiplier", "max_grad_norm")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    def to_json(self) -> dict[str, Any]:
        """The certificate as a JSON object (unset optional fields left out)."""
        return self.model_dump(mode="json", exclude_none=True)


@dataclass
class PrivacyLedger:
    """The spend of a run or session: an accountant plus the parameters it is charged with."""

    accountant_name: str
    accountant: PrivacyAccountant
    sampling_rate: float
    noise_multiplier: float
    delta: float
    target_epsilon: float | None
    warn_fraction: float
    secure_rng: bool
    max_grad_norm: float
    secure_mode: bool = False
    #: Optimizer steps covered by one charge (PPO epochs on one sample; see tensafe.rl.privacy).
    updates_per_charge: int = 1
    #: Noise multiplier of each optimizer step; ``noise_multiplier`` is what one charge is accounted at.
    update_noise_multiplier: float = 0.0
    sampling: str = SAMPLING_BY_ENGINE
    #: Certificate fields the run or session adds (mode, privacy unit, protected set, what lies outside).
    statement: dict[str, Any] = field(default_factory=dict)
    warned: bool = False
    #: Epsilon by (steps composed, delta): the accountant's answer does not change until it composes again.
    _epsilons: dict[tuple[int, float], float] = field(default_factory=dict, repr=False, compare=False)

    def charge(self) -> None:
        """Account for one sampled batch (``updates_per_charge`` optimizer steps)."""
        self.accountant.compose_step(self.sampling_rate, self.noise_multiplier)

    def epsilon(self) -> float:
        """Epsilon spent so far (computed once per number of steps composed: a step's
        admission computed it already, and reports, results and audit records ask again)."""
        key = (self.accountant.steps, self.delta)
        if key not in self._epsilons:
            self._epsilons = {key: self.accountant.get_epsilon(self.delta)}
        return self._epsilons[key]

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
        value = trial.get_epsilon(self.delta)
        self._epsilons[(trial.steps, self.delta)] = value  # what epsilon() returns once the step is charged
        return value

    def randomness(self) -> str:
        if not self.secure_rng:
            return RANDOMNESS_SEEDED
        return RANDOMNESS_SECURE_MODE if self.secure_mode else RANDOMNESS_SECURE

    def certificate(self) -> PrivacyCertificate:
        return PrivacyCertificate(
            accountant=self.accountant_name,
            epsilon=self.epsilon(),
            delta=self.delta,
            steps=self.accountant.steps,
            target_epsilon=self.target_epsilon,
            sampling_rate=self.sampling_rate,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            sampling=self.sampling,
            randomness=self.randomness(),
            reproducible_noise=not self.secure_rng,
            **self.statement,
        )

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
        """Take over a saved spend; refuses one made with other privacy parameters, naming what to change."""
        if state["accountant"] != self.accountant_name:
            raise UsageError(
                f"dp.accountant: the checkpoint was charged by {state['accountant']!r}, not {self.accountant_name!r}; "
                "resume with the same accountant"
            )
        differences = [
            (name, saved, mine)
            for name, saved, mine in (
                (
                    "sampling rate q (training.batch_size / training records)",
                    state["sampling_rate"],
                    self.sampling_rate,
                ),
                ("dp.noise_multiplier (as charged)", state["noise_multiplier"], self.noise_multiplier),
                ("dp.target_delta", state["delta"], self.delta),
            )
            if not math.isclose(saved, mine, rel_tol=1e-9, abs_tol=0.0)
        ]
        if differences:
            detail = "; ".join(
                f"{name}: checkpoint {saved:.6g}, this config {mine:.6g}" for name, saved, mine in differences
            )
            raise UsageError(f"the checkpoint was made with other privacy parameters ({detail}); resume with the same")
        self.accountant.load_state(state["accountant_state"])
        self._epsilons = {}
        self.warned = bool(state["warned"])


def build_ledger(
    config: RunConfig, registry: Registry, n_train: int | None, declared_rate: float | None = None
) -> PrivacyLedger | None:
    """The ledger for a run over ``n_train`` records sampled by the engine (None without DP).

    With ``declared_rate`` the caller supplies the batches and declares their
    sampling rate; ``n_train`` (if known) then only sets the default delta.
    """
    from tensafe.rl.privacy import charged_noise_multiplier, update_noise_multiplier

    dp, training = config.dp, config.training
    if not dp.enabled:
        return None
    accountant = registry.accountant(dp.accountant)
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
    updates = config.rl.epochs if config.rl is not None else 1
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
        dp.max_grad_norm,
        secure_mode=dp.secure_mode,
        updates_per_charge=updates,
        update_noise_multiplier=sigma,
        sampling=SAMPLING_BY_ENGINE if declared_rate is None else SAMPLING_DECLARED,
    )
