"""From canary scores to membership guesses, and from right guesses to the audit's verdict."""

from __future__ import annotations

from collections.abc import Sequence

from tensafe.auditing.bound import ceiling, epsilon_lower_bound
from tensafe.engine.ledger import AUDIT_CONSISTENT, AUDIT_VIOLATION, AuditMode, AuditSummary
from tensafe.engine.report import render_audit

#: A membership guess: included, excluded, or abstained (None).
Guess = bool | None


def rank_guesses(scores: Sequence[float], guesses: int) -> list[Guess]:
    """Guess "included" for the ``guesses // 2`` highest scores and "excluded" for as many lowest; abstain on the rest.

    Ties keep the canaries' order, which is independent of their inclusion.
    """
    if not 0 <= guesses <= len(scores):
        raise ValueError(f"cannot make {guesses} guesses about {len(scores)} canaries")
    order = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)
    result: list[Guess] = [None] * len(scores)
    half = guesses // 2
    for i in order[:half]:
        result[i] = True
    for i in order[len(order) - (guesses - half) :]:
        result[i] = False
    return result


def threshold_guesses(scores: Sequence[float], threshold: float) -> list[Guess]:
    """Guess "included" for every score above ``threshold`` and "excluded" for the others (no abstention)."""
    return [score > threshold for score in scores]


def judge(
    *,
    mode: AuditMode,
    guesses: Sequence[Guess],
    included: Sequence[bool],
    claimed_epsilon: float,
    delta: float,
    accountant: str,
    steps: int,
    confidence: float,
) -> AuditSummary:
    """The audit's result: right guesses, the lower bound they certify at ``confidence``, and the verdict."""
    m = len(included)
    made = [(g, s) for g, s in zip(guesses, included, strict=True) if g is not None]
    right = sum(g == s for g, s in made)
    p = 1.0 - confidence
    bound = epsilon_lower_bound(m, len(made), right, delta, p)
    return AuditSummary(
        mode=mode,
        accountant=accountant,
        claimed_epsilon=claimed_epsilon,
        delta=delta,
        steps=steps,
        epsilon_lower_bound=bound,
        confidence=confidence,
        canaries=m,
        guesses=len(made),
        correct=right,
        ceiling=ceiling(m, m, delta, p),
        guesses_ceiling=ceiling(m, len(made), delta, p),
        verdict=AUDIT_VIOLATION if bound > claimed_epsilon else AUDIT_CONSISTENT,
    )


def render(summary: AuditSummary) -> list[str]:
    """The audit in a few lines of text: what was claimed, what was measured, and the verdict."""
    return render_audit(summary.model_dump(mode="json"))
