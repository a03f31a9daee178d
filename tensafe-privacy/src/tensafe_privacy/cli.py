"""``tensafe privacy``: epsilon, noise calibration and step planning for DP-SGD.

Every command works with any registered :class:`tensafe.interfaces.PrivacyAccountant`,
ours or a third party's, through that interface alone: each question is put to a
fresh accountant from the registry. This module imports nothing heavy; the
accountant's factory does.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

import click

from tensafe.cli.context import plugin_manager
from tensafe.errors import PluginError, TensafeError, UsageError
from tensafe_privacy.audit_cli import audit_cmd

if TYPE_CHECKING:
    from tensafe.interfaces import PrivacyAccountant

T = TypeVar("T")

#: ``plan`` stops doubling its search here and reports this many steps as the most it looked at.
MAX_PLANNED_STEPS = 10**9


def _positive_float(name: str) -> Callable[[click.Context, click.Parameter, float], float]:
    def check(ctx: click.Context, param: click.Parameter, value: float) -> float:
        if value is not None and (math.isnan(value) or value <= 0 or math.isinf(value)):
            raise click.BadParameter(f"must be a positive finite number, got {value}")
        return value

    return check


def _common(func: Any) -> Any:
    func = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")(func)
    func = click.option(
        "--accountant",
        default="rdp",
        show_default=True,
        help="Any registered privacy accountant (tensafe-privacy: rdp, pld (tight), prv).",
    )(func)
    func = click.option(
        "--delta", required=True, type=click.FloatRange(0, 1, min_open=True, max_open=True), help="delta, in (0, 1)."
    )(func)
    func = click.option(
        "--batch-size", "-b", type=click.IntRange(min=1), help="Expected batch size B (with --dataset-size: q = B / N)."
    )(func)
    func = click.option("--dataset-size", "-n", type=click.IntRange(min=1), help="Records in the dataset N.")(func)
    return click.option(
        "--sampling-rate",
        "-q",
        type=click.FloatRange(0, 1, min_open=True),
        help="Poisson sampling rate q = expected batch size / dataset size, in (0, 1]; "
        "or give --dataset-size and --batch-size.",
    )(func)


def _sampling_rate(sampling_rate: float | None, dataset_size: int | None, batch_size: int | None) -> float:
    """q from ``-q``, or from ``--batch-size`` / ``--dataset-size``: exactly one of the two ways."""
    by_sizes = dataset_size is not None or batch_size is not None
    if sampling_rate is not None:
        if by_sizes:
            raise click.UsageError("give --sampling-rate or --dataset-size with --batch-size, not both")
        return sampling_rate
    if dataset_size is None or batch_size is None:
        raise click.UsageError("give --sampling-rate (-q), or both --dataset-size (-n) and --batch-size (-b)")
    if batch_size > dataset_size:
        raise click.BadParameter(
            f"{batch_size} is larger than --dataset-size {dataset_size}", param_hint="'--batch-size'"
        )
    return batch_size / dataset_size


def _sizes(dataset_size: int | None, batch_size: int | None) -> dict[str, int]:
    """The sizes q came from, for JSON output (none when q was given)."""
    return {"dataset_size": dataset_size, "batch_size": batch_size} if dataset_size and batch_size else {}


def _within(reached: float, target: float) -> str:
    """How epsilon compares with the target: said as it is, even when an accountant calibrated too little noise."""
    return f"{reached:.4f} <= {target:g}" if reached <= target else f"{reached:.4f} > {target:g}, ABOVE THE TARGET"


class _Accountants:
    """Fresh accountants of one registered name, and the questions the commands put to them."""

    def __init__(self, ctx: click.Context, name: str) -> None:
        pm = plugin_manager(ctx)
        self.registry = pm.registry
        self.name = name
        self.who = (
            f"privacy accountant {name!r} from {pm.describe(self.registry.registration('accountant', name).plugin)}"
        )

    def call(self, what: str, func: Callable[[], T]) -> T:
        """``func()``, with a third-party accountant's unexpected exception named instead of a traceback."""
        try:
            return func()
        except TensafeError:
            raise
        except Exception as exc:  # the accountant is a plugin's code
            raise PluginError(f"{self.who} failed in {what}: {type(exc).__name__}: {exc}") from exc

    def fresh(self) -> PrivacyAccountant:
        return self.registry.accountant(self.name)

    def epsilon(self, q: float, sigma: float, steps: int, delta: float) -> float:
        """Epsilon after ``steps`` steps at (q, sigma), from a fresh accountant."""
        accountant = self.fresh()
        if steps:
            self.call("compose_step", lambda: accountant.compose_step(q, sigma, steps))
        return float(self.call("get_epsilon", lambda: accountant.get_epsilon(delta)))

    def calibrate(self, target_epsilon: float, delta: float, q: float, steps: int) -> float:
        accountant = self.fresh()
        sigma = self.call(
            "calibrate_noise_multiplier", lambda: accountant.calibrate_noise_multiplier(target_epsilon, delta, q, steps)
        )
        return float(sigma)

    def max_steps(self, q: float, sigma: float, delta: float, target_epsilon: float) -> int:
        """The most steps at (q, sigma) whose epsilon stays <= the target: doubling, then bisection.

        Relies only on epsilon not decreasing as steps are added.
        """

        def fits(n: int) -> bool:
            return n == 0 or self.epsilon(q, sigma, n, delta) <= target_epsilon

        low, high = 0, 1
        while fits(high):
            low, high = high, high * 2
            if high > MAX_PLANNED_STEPS:
                return low
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if fits(mid) else (low, mid)
        return low


def _emit(as_json: bool, data: dict[str, Any], text: str) -> None:
    click.echo(json.dumps(data, indent=2) if as_json else text)


@click.group("privacy")
def privacy() -> None:
    """Privacy accounting for DP-SGD (Poisson-sampled Gaussian steps, add/remove-one neighbours),
    with any registered accountant.

    \b
    Examples:
      tensafe privacy epsilon -q 0.01 --noise-multiplier 1.1 --steps 10000 --delta 1e-5
      tensafe privacy calibrate --epsilon 3 -q 0.01 --steps 1000 --delta 1e-5 --accountant pld
      tensafe privacy plan --epsilon 8 -q 0.01 --noise-multiplier 1.0 --delta 1e-5
      tensafe privacy plan --epsilon 8 -n 60000 -b 256 --epochs 15 --delta 1e-5
    """


@privacy.command("epsilon")
@_common
@click.option(
    "--noise-multiplier",
    "-s",
    required=True,
    type=float,
    callback=_positive_float("noise-multiplier"),
    help="Noise standard deviation divided by the clipping norm.",
)
@click.option("--steps", "-t", required=True, type=click.IntRange(min=0), help="Optimizer steps.")
@click.pass_context
def epsilon_cmd(
    ctx: click.Context,
    sampling_rate: float | None,
    dataset_size: int | None,
    batch_size: int | None,
    delta: float,
    accountant: str,
    as_json: bool,
    noise_multiplier: float,
    steps: int,
) -> None:
    """Epsilon spent by STEPS steps at sampling rate q and noise multiplier sigma."""
    q = _sampling_rate(sampling_rate, dataset_size, batch_size)
    epsilon = _Accountants(ctx, accountant).epsilon(q, noise_multiplier, steps, delta)
    data = {
        "accountant": accountant,
        "epsilon": epsilon,
        "delta": delta,
        "sampling_rate": q,
        "noise_multiplier": noise_multiplier,
        "steps": steps,
        **_sizes(dataset_size, batch_size),
    }
    _emit(
        as_json,
        data,
        f"epsilon = {epsilon:.4f} at delta = {delta:g} ({accountant}, {steps} steps, "
        f"q = {q:g}, sigma = {noise_multiplier:g})",
    )


@privacy.command("calibrate")
@_common
@click.option("--epsilon", "-e", required=True, type=float, callback=_positive_float("epsilon"), help="Target epsilon.")
@click.option("--steps", "-t", required=True, type=click.IntRange(min=1), help="Optimizer steps planned.")
@click.pass_context
def calibrate_cmd(
    ctx: click.Context,
    sampling_rate: float | None,
    dataset_size: int | None,
    batch_size: int | None,
    delta: float,
    accountant: str,
    as_json: bool,
    epsilon: float,
    steps: int,
) -> None:
    """The smallest noise multiplier that keeps STEPS steps within EPSILON (never above it)."""
    q = _sampling_rate(sampling_rate, dataset_size, batch_size)
    accountants = _Accountants(ctx, accountant)
    sigma = accountants.calibrate(epsilon, delta, q, steps)
    reached = accountants.epsilon(q, sigma, steps, delta)
    data = {
        "accountant": accountant,
        "noise_multiplier": sigma,
        "epsilon": reached,
        "target_epsilon": epsilon,
        "delta": delta,
        "sampling_rate": q,
        "steps": steps,
        **_sizes(dataset_size, batch_size),
    }
    _emit(
        as_json,
        data,
        f"noise multiplier = {sigma:.4f} (epsilon {_within(reached, epsilon)} at delta {delta:g}, "
        f"{accountant}, {steps} steps, q = {q:g})",
    )


@privacy.command("plan")
@_common
@click.option("--epsilon", "-e", required=True, type=float, callback=_positive_float("epsilon"), help="Privacy budget.")
@click.option(
    "--noise-multiplier",
    "-s",
    type=float,
    callback=_positive_float("noise-multiplier"),
    help="Noise standard deviation divided by the clipping norm: plan the most steps.",
)
@click.option(
    "--epochs",
    type=float,
    callback=_positive_float("epochs"),
    help="Passes over the data (steps = int(epochs / q), as Opacus counts them): plan the noise multiplier.",
)
@click.pass_context
def plan_cmd(
    ctx: click.Context,
    sampling_rate: float | None,
    dataset_size: int | None,
    batch_size: int | None,
    delta: float,
    accountant: str,
    as_json: bool,
    epsilon: float,
    noise_multiplier: float | None,
    epochs: float | None,
) -> None:
    """Plan a run within EPSILON: the most steps at noise multiplier sigma (--noise-multiplier), or the
    noise multiplier for a number of epochs (--epochs, like Opacus' get_noise_multiplier)."""
    q = _sampling_rate(sampling_rate, dataset_size, batch_size)
    if (noise_multiplier is None) == (epochs is None):
        raise click.UsageError("give --noise-multiplier (to plan the steps) or --epochs (to plan the noise), not both")
    accountants = _Accountants(ctx, accountant)
    common = {
        "accountant": accountant,
        "target_epsilon": epsilon,
        "delta": delta,
        "sampling_rate": q,
        **_sizes(dataset_size, batch_size),
    }
    where = f"at delta {delta:g}, {accountant}, q = {q:g}"
    if noise_multiplier is not None:
        steps = accountants.max_steps(q, noise_multiplier, delta, epsilon)
        reached = accountants.epsilon(q, noise_multiplier, steps, delta)
        data = {
            **common,
            "max_steps": steps,
            "epochs": steps * q,
            "epsilon": reached,
            "noise_multiplier": noise_multiplier,
        }
        text = (
            f"at most {steps} steps (~{steps * q:.1f} epochs; epsilon {_within(reached, epsilon)} "
            f"{where}, sigma = {noise_multiplier:g})"
        )
    else:
        epochs = cast(float, epochs)
        # epochs / q rounded down as Opacus does, without losing a step to rounding (3 / 0.1 = 29.999...).
        steps = math.floor(epochs / q * (1 + 1e-12))
        if steps < 1:
            raise UsageError(f"{epochs:g} epochs at q = {q:g} is less than one step")
        sigma = accountants.calibrate(epsilon, delta, q, steps)
        reached = accountants.epsilon(q, sigma, steps, delta)
        data = {**common, "noise_multiplier": sigma, "steps": steps, "epochs": epochs, "epsilon": reached}
        text = (
            f"noise multiplier = {sigma:.4f} for {epochs:g} epochs = {steps} steps "
            f"(epsilon {_within(reached, epsilon)} {where})"
        )
    _emit(as_json, data, text)


privacy.add_command(audit_cmd)
