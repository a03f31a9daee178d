"""Verifiable rewards: built-in checkers and their resolution by registered name or dotted path.

A reward function scores one completion against the record's reference (its
``completion`` field) and returns a float. The built-ins are registered by
core's own plugin through ``tensafe_register_rewards``, like anyone else's; a
config names them, or any ``package.module:attribute`` callable, in
``rl.rewards``. Several terms are combined as a weighted sum.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tensafe.errors import ConfigError
from tensafe.interfaces import RewardFunction

if TYPE_CHECKING:
    from tensafe.config import RewardTerm
    from tensafe.registry import Registry

_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _answer(text: str, pattern: re.Pattern[str] | None) -> str | None:
    """The answer part of a completion: the pattern's first group, else the first line without a final '.'."""
    if pattern is not None:
        found = pattern.search(text)
        if found is None:
            return None
        return (found.group(1) if found.groups() else found.group(0)).strip()
    line = text.strip().split("\n", 1)[0].strip()
    return line[:-1].rstrip() if line.endswith(".") else line


def _compile(pattern: str | None, option: str) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"reward option {option}={pattern!r} is not a valid regular expression: {exc}") from None


class ExactMatch:
    """1.0 when the completion's answer equals the reference's, else 0.0.

    The answer is the first line without a trailing period (or the first group
    of ``answer_pattern``); ``prefix`` accepts an answer that starts with the
    reference's; ``any_of`` splits the reference into several accepted answers.
    """

    def __init__(
        self,
        *,
        answer_pattern: str | None = None,
        ignore_case: bool = False,
        prefix: bool = False,
        any_of: str | None = None,
    ) -> None:
        self.pattern = _compile(answer_pattern, "answer_pattern")
        self.ignore_case = ignore_case
        self.prefix = prefix
        self.any_of = any_of

    def __call__(self, prompt: str, completion: str, reference: str | None) -> float:
        if reference is None:
            raise ValueError("exact_match needs a reference answer")
        got = _answer(completion, self.pattern)
        if got is None:
            return 0.0
        accepted = reference.split(self.any_of) if self.any_of else [reference]
        for want in (_answer(a, None) or "" for a in accepted):
            a, b = (got.casefold(), want.casefold()) if self.ignore_case else (got, want)
            if a.startswith(b) if self.prefix else a == b:
                return 1.0
        return 0.0


class NumericMatch:
    """1.0 when the first number in the completion is within a tolerance of the reference's number."""

    def __init__(self, *, tolerance: float = 1e-6, relative: bool = False) -> None:
        if not tolerance >= 0:
            raise ConfigError(f"reward option tolerance must be >= 0, got {tolerance}")
        self.tolerance = tolerance
        self.relative = relative

    def __call__(self, prompt: str, completion: str, reference: str | None) -> float:
        want = _NUMBER.search(reference or "")
        if want is None:
            raise ValueError(f"reference {reference!r} holds no number")
        got = _NUMBER.search(completion)
        if got is None:
            return 0.0
        a, b = float(got.group(0)), float(want.group(0))
        bound = self.tolerance * abs(b) if self.relative else self.tolerance
        return float(abs(a - b) <= bound)


class RegexMatch:
    """1.0 when the completion matches ``pattern`` (a format check), else 0.0."""

    def __init__(self, *, pattern: str, full: bool = False) -> None:
        compiled = _compile(pattern, "pattern")
        assert compiled is not None
        self.pattern = compiled
        self.full = full

    def __call__(self, prompt: str, completion: str, reference: str | None) -> float:
        text = completion.strip()
        found = self.pattern.fullmatch(text) if self.full else self.pattern.search(text)
        return float(found is not None)


@dataclass(frozen=True)
class WeightedSum:
    """The weighted sum of several rewards; any failing term fails the whole score."""

    terms: tuple[tuple[float, RewardFunction], ...]

    def __call__(self, prompt: str, completion: str, reference: str | None) -> float:
        return sum(w * float(fn(prompt, completion, reference)) for w, fn in self.terms)


#: The built-in rewards, registered by core's plugin.
BUILTIN_REWARDS: dict[str, Callable[..., RewardFunction]] = {
    "exact_match": ExactMatch,
    "numeric": NumericMatch,
    "regex": RegexMatch,
}


def _import_path(path: str) -> Any:
    module_name, _, attribute = path.partition(":") if ":" in path else path.rpartition(".")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"reward {path!r} cannot be imported: {exc}") from None
    return obj


def resolve_term(registry: Registry, term: RewardTerm) -> RewardFunction:
    """The reward function a config term names, built with its options and checked.

    A registered name's factory is called with the options; a dotted path may
    name a class (instantiated with the options) or the reward function itself.
    """
    names = registry.names("reward")
    if term.name in names:
        registration = registry.registration("reward", term.name)
        factory: Callable[..., Any] = registration.factory
        origin = f"plugin {registration.plugin!r}"
    elif "." in term.name or ":" in term.name:
        target = _import_path(term.name)
        origin = "its module"
        if not isinstance(target, type):
            if term.options:
                raise ConfigError(f"rl.rewards: {term.name!r} is a function; options need a class or a registered name")
            factory = lambda: target  # noqa: E731 - the function is the reward
        else:
            factory = target
    else:
        raise ConfigError(
            f"rl.rewards: no reward function {term.name!r} is registered (available: {', '.join(names) or 'none'}); "
            "name a registered one or give a dotted path 'package.module:function'"
        )
    try:
        obj = factory(**term.options)
    except ConfigError:
        raise
    except TypeError as exc:
        raise ConfigError(f"rl.rewards: reward {term.name!r} rejected its options {term.options}: {exc}") from None
    except Exception as exc:  # third-party code: any failure is reported as the reward's, never a traceback
        raise ConfigError(
            f"rl.rewards: reward {term.name!r} from {origin} could not be created: {type(exc).__name__}: {exc}"
        ) from None
    if not isinstance(obj, RewardFunction):
        raise ConfigError(f"rl.rewards: {term.name!r} from {origin} is not callable as a reward function")
    return obj


def resolve_rewards(registry: Registry, terms: Sequence[RewardTerm]) -> RewardFunction:
    """One reward function for all configured terms (a weighted sum when there are several)."""
    functions = [(term.weight, resolve_term(registry, term)) for term in terms]
    if len(functions) == 1 and functions[0][0] == 1.0:
        return functions[0][1]
    return WeightedSum(tuple(functions))


def score(reward: RewardFunction, prompt: str, completion: str, reference: str | None) -> float | str:
    """The reward, or why there is none: an exception's message or a non-finite value."""
    try:
        value = float(reward(prompt, completion, reference))
    except Exception as exc:  # a user's reward function may fail in any way; the rollout is excluded
        return f"{type(exc).__name__}: {exc}"
    if not math.isfinite(value):
        return f"reward is {value}"
    return value
