"""The canaries of a one-run audit: which are included, and what each one is.

Every draw comes from the operating system's CSPRNG (:mod:`secrets`): the
audit's guarantee needs each canary's inclusion to be an independent fair coin
that nothing else in the run can predict.
"""

from __future__ import annotations

import secrets

from tensafe.data import Record
from tensafe.errors import UsageError

#: Letters of a black-box canary's words: random lowercase words are text no record contains.
LETTERS = "abcdefghijklmnopqrstuvwxyz"
#: Words in a black-box canary, and the lengths a word may have.
CANARY_WORDS = 6
WORD_LENGTHS = range(3, 10)


def inclusion(m: int) -> list[bool]:
    """Whether each of ``m`` canaries is included: independently, with probability 1/2."""
    return [secrets.randbits(1) == 1 for _ in range(m)]


def canary_records(m: int) -> list[Record]:
    """``m`` black-box canaries: records of random lowercase words, no two alike."""
    records: list[Record] = []
    seen: set[str] = set()
    while len(records) < m:
        words = (
            "".join(secrets.choice(LETTERS) for _ in range(secrets.choice(WORD_LENGTHS))) for _ in range(CANARY_WORDS)
        )
        text = " " + " ".join(words)
        if text not in seen:
            seen.add(text)
            records.append(Record("", text))
    return records


def canary_coordinates(m: int, parameters: int) -> list[int]:
    """``m`` distinct coordinates of the flattened trainable parameters, one per white-box canary."""
    if m > parameters:
        raise UsageError(
            f"a white-box audit needs one trainable parameter per canary: {m} canaries, but the model trains "
            f"only {parameters} parameters; use fewer canaries"
        )
    return secrets.SystemRandom().sample(range(parameters), m)
