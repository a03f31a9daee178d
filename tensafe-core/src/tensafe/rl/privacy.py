"""How DP-RLVR maps a record-level guarantee onto per-rollout clipping and the accountant.

The privacy unit is a record (one prompt of the dataset); the orchestrator
Poisson-samples records at rate ``q``. Each sampled record yields ``G``
rollouts, and the backend clips each datum (rollout) separately, so a record
could move the summed gradient by ``G`` times the per-datum clip. TenSafe
therefore clips each rollout to ``C / G`` and asks the backend for noise
multiplier ``sigma * G`` relative to that clip: the noise standard deviation is
``sigma * C`` and one record moves the sum by at most ``G * C / G = C``, so
``dp.noise_multiplier`` and ``dp.max_grad_norm`` mean exactly what they mean in
supervised runs (per record, per update).

PPO takes ``k`` optimizer steps on one Poisson sample. Charging ``k`` sampled
steps would under-report: it assumes ``k`` fresh samples, each amplifying
privacy on its own. Instead the ``k`` updates are one mechanism on the sample:
``k`` adaptively composed Gaussian mechanisms of sensitivity ``C`` and noise
``sigma * C`` have exactly the privacy curve of one Gaussian mechanism with
noise multiplier ``sigma / sqrt(k)`` (Gaussian DP composes as
``mu = sqrt(k) / sigma``; Renyi DP adds ``k * alpha / (2 sigma^2)``), and
Poisson subsampling amplifies that mechanism as a whole. The accountant is
charged one step of ``(q, sigma / sqrt(k))`` per sampled batch, which covers
all ``k`` optimizer steps of it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tensafe.config import RLConfig, RunConfig


def charged_noise_multiplier(update_sigma: float, updates: int) -> float:
    """The noise multiplier the accountant is charged for ``updates`` optimizer steps on one sample."""
    return update_sigma / math.sqrt(updates)


def update_noise_multiplier(charged_sigma: float, updates: int) -> float:
    """The per-update noise multiplier that makes ``updates`` steps on one sample cost ``charged_sigma``."""
    return charged_sigma * math.sqrt(updates)


def backend_config(config: RunConfig) -> RunConfig:
    """The config the backend trains with: each rollout clipped to C / G, noise multiplier sigma * G.

    The backend's noise std (its multiplier times its clip) stays ``sigma * C``.
    """
    rl = config.rl
    if rl is None or not config.dp.enabled:
        return config
    assert config.dp.noise_multiplier is not None  # calibrated by the orchestrator before this
    dp = config.dp.model_copy(
        update={
            "max_grad_norm": config.dp.max_grad_norm / rl.group_size,
            "noise_multiplier": config.dp.noise_multiplier * rl.group_size,
        }
    )
    return config.model_copy(update={"dp": dp})


def certificate_details(config: RunConfig, rl: RLConfig) -> dict[str, Any]:
    """What a privacy certificate records about how RLVR updates were made private."""
    return {
        "mode": "rlvr",
        "privacy_unit": "record (prompt); all of its rollouts together",
        "rollouts_per_record": rl.group_size,
        "per_rollout_clip": config.dp.max_grad_norm / rl.group_size,
        "per_record_sensitivity": config.dp.max_grad_norm,
        "updates_per_sample": rl.epochs,
        "noise_multiplier_per_update": config.dp.noise_multiplier,
        "accounting": "one subsampled Gaussian step of sigma / sqrt(updates_per_sample) per sampled batch",
    }
