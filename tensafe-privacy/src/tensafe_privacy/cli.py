"""``tensafe privacy``: epsilon, noise calibration and step planning for DP-SGD."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import click

from tensafe.cli.context import plugin_manager
from tensafe.errors import UsageError
from tensafe_privacy.accountants import DPSGDAccountant


def _positive_float(name: str) -> Callable[[click.Context, click.Parameter, float], float]:
    def check(ctx: click.Context, param: click.Parameter, value: float) -> float:
        if value is not None and (math.isnan(value) or value <= 0 or math.isinf(value)):
            raise click.BadParameter(f"must be a positive finite number, got {value}")
        return value

    return check


def _common(func: Any) -> Any:
    func = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")(func)
    func = click.option(
        "--accountant", default="rdp", show_default=True, help="Registered accountant: rdp, pld (tight) or prv."
    )(func)
    func = click.option(
        "--delta", required=True, type=click.FloatRange(0, 1, min_open=True, max_open=True), help="delta, in (0, 1)."
    )(func)
    return click.option(
        "--sampling-rate",
        "-q",
        required=True,
        type=click.FloatRange(0, 1, min_open=True),
        help="Poisson sampling rate q = expected batch size / dataset size, in (0, 1].",
    )(func)


def _accountant(ctx: click.Context, name: str) -> DPSGDAccountant:
    accountant = plugin_manager(ctx).registry.accountant(name)
    if not isinstance(accountant, DPSGDAccountant):
        raise UsageError(f"accountant {name!r} is not a tensafe-privacy DP-SGD accountant")
    return accountant


def _emit(as_json: bool, data: dict[str, Any], text: str) -> None:
    click.echo(json.dumps(data, indent=2) if as_json else text)


@click.group("privacy")
def privacy() -> None:
    """Privacy accounting for DP-SGD (Poisson-sampled Gaussian steps, add/remove-one neighbours).

    \b
    Examples:
      tensafe privacy epsilon -q 0.01 --noise-multiplier 1.1 --steps 10000 --delta 1e-5
      tensafe privacy calibrate --epsilon 3 -q 0.01 --steps 1000 --delta 1e-5 --accountant pld
      tensafe privacy plan --epsilon 8 -q 0.01 --noise-multiplier 1.0 --delta 1e-5
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
    sampling_rate: float,
    delta: float,
    accountant: str,
    as_json: bool,
    noise_multiplier: float,
    steps: int,
) -> None:
    """Epsilon spent by STEPS steps at sampling rate q and noise multiplier sigma."""
    acc = _accountant(ctx, accountant)
    acc.compose_step(sampling_rate, noise_multiplier, steps)
    epsilon = acc.get_epsilon(delta)
    data = {
        "accountant": accountant,
        "epsilon": epsilon,
        "delta": delta,
        "sampling_rate": sampling_rate,
        "noise_multiplier": noise_multiplier,
        "steps": steps,
    }
    _emit(
        as_json,
        data,
        f"epsilon = {epsilon:.4f} at delta = {delta:g} ({accountant}, {steps} steps, "
        f"q = {sampling_rate:g}, sigma = {noise_multiplier:g})",
    )


@privacy.command("calibrate")
@_common
@click.option("--epsilon", "-e", required=True, type=float, callback=_positive_float("epsilon"), help="Target epsilon.")
@click.option("--steps", "-t", required=True, type=click.IntRange(min=1), help="Optimizer steps planned.")
@click.pass_context
def calibrate_cmd(
    ctx: click.Context, sampling_rate: float, delta: float, accountant: str, as_json: bool, epsilon: float, steps: int
) -> None:
    """The smallest noise multiplier that keeps STEPS steps within EPSILON (never above it)."""
    acc = _accountant(ctx, accountant)
    sigma = acc.calibrate_noise_multiplier(epsilon, delta, sampling_rate, steps)
    reached = acc.epsilon_with(sampling_rate, sigma, steps, delta)
    data = {
        "accountant": accountant,
        "noise_multiplier": sigma,
        "epsilon": reached,
        "target_epsilon": epsilon,
        "delta": delta,
        "sampling_rate": sampling_rate,
        "steps": steps,
    }
    _emit(
        as_json,
        data,
        f"noise multiplier = {sigma:.4f} (epsilon {reached:.4f} <= {epsilon:g} at delta {delta:g}, "
        f"{accountant}, {steps} steps, q = {sampling_rate:g})",
    )


@privacy.command("plan")
@_common
@click.option("--epsilon", "-e", required=True, type=float, callback=_positive_float("epsilon"), help="Privacy budget.")
@click.option(
    "--noise-multiplier",
    "-s",
    required=True,
    type=float,
    callback=_positive_float("noise-multiplier"),
    help="Noise standard deviation divided by the clipping norm.",
)
@click.pass_context
def plan_cmd(
    ctx: click.Context,
    sampling_rate: float,
    delta: float,
    accountant: str,
    as_json: bool,
    epsilon: float,
    noise_multiplier: float,
) -> None:
    """The most steps that stay within EPSILON at sampling rate q and noise multiplier sigma."""
    acc = _accountant(ctx, accountant)
    steps = acc.max_steps(noise_multiplier, sampling_rate, delta, epsilon)
    reached = acc.epsilon_with(sampling_rate, noise_multiplier, steps, delta) if steps else 0.0
    data = {
        "accountant": accountant,
        "max_steps": steps,
        "epsilon": reached,
        "target_epsilon": epsilon,
        "delta": delta,
        "sampling_rate": sampling_rate,
        "noise_multiplier": noise_multiplier,
    }
    epochs = steps * sampling_rate
    _emit(
        as_json,
        data,
        f"at most {steps} steps (~{epochs:.1f} epochs; epsilon {reached:.4f} <= {epsilon:g} at "
        f"delta {delta:g}, {accountant}, q = {sampling_rate:g}, sigma = {noise_multiplier:g})",
    )
