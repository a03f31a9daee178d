"""Statistical checks that a backend declaring ``dp_sgd`` really runs DP-SGD (see docs/plugins.md, "Proving DP-SGD").

A backend that declares ``dp_sgd`` must also declare ``dp_probe``: its
``noised_gradient()`` returns the gradient the last DP step handed to the
optimizer, which is what the privacy guarantee covers, and these checks read it:

* clipping: data whose gradients are far above the clipping norm C move it by
  exactly ``k * C / B`` for k copies of one datum and by at most that for k
  different data (B = ``training.batch_size``, the expected batch size), under
  noise faint enough not to matter;
* noise: an empty step (an empty Poisson batch) is noise alone, of standard
  deviation ``sigma * C / B`` in every coordinate, centred and Gaussian;
* freshness: two freshly built backends, and a backend restored from another's
  ``save_state``, draw independent noise for identical steps, so the noise
  comes from a freshly seeded generator whose state is never saved.

Every statistical check is a finite-sample bound (:mod:`tensafe.testing.noise_bounds`)
that an honest backend fails with probability at most ``dp_false_alarm``; all
run with ``dp.secure_rng`` on, the configuration whose privacy is claimed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from tensafe import capabilities
from tensafe.capabilities import has
from tensafe.config import RunConfig
from tensafe.interfaces import MLBackend
from tensafe.testing.ml_backend_harness import TEXT, MLBackendHarness
from tensafe.testing.noise_bounds import (
    distance_to_normal,
    distribution_bound,
    mean_bound,
    norm,
    norm_ceiling,
    sum_of_squares,
    variance_ratio_bounds,
    variance_ratio_floor,
)
from tensafe.testing.support import requires_capability
from tensafe.types import Datum

#: Texts of distinct data for the clipping checks.
TEXTS = (TEXT, "pack my box with five dozen liquor jugs", "how vexingly quick daft zebras jump")


@dataclass(frozen=True)
class DPRun:
    """A backend initialised for a DP check, with the config that says what its noise must be."""

    backend: MLBackend
    config: RunConfig
    parameters: int

    @property
    def batch_size(self) -> int:
        return self.config.training.batch_size

    @property
    def clip(self) -> float:
        return self.config.dp.max_grad_norm

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise in each coordinate of the noised gradient: sigma * C / B."""
        sigma = self.config.dp.noise_multiplier
        assert sigma is not None, "dp_run_config must set dp.noise_multiplier"
        return sigma * self.clip / self.batch_size


class DPSGDConformance(MLBackendHarness):
    """The DP-SGD checks; :class:`~tensafe.testing.MLBackendConformance` includes them."""

    # -- overridable settings ---------------------------------------------------

    #: Clipping norm C of every check (not 1, so that a backend ignoring ``max_grad_norm`` shows).
    dp_clip_norm: ClassVar[float] = 0.5
    #: Noise multiplier of the noise checks.
    dp_noise_multiplier: ClassVar[float] = 1.0
    #: Noise multiplier of the clipping checks: faint enough that the clipped gradient shows through.
    dp_faint_noise_multiplier: ClassVar[float] = 1e-6
    #: Cross-entropy weight on every token of a heavy datum, whose gradient is then far above C.
    dp_heavy_weight: ClassVar[float] = 1e6
    #: Relative tolerance on the clipped norm, for floating-point rounding (float32 backends included).
    dp_norm_rtol: ClassVar[float] = 1e-3
    #: Noise coordinates each statistical check pools, over as many steps as it takes.
    dp_noise_coordinates: ClassVar[int] = 20_000
    #: Probability that an honest backend fails any one statistical check.
    dp_false_alarm: ClassVar[float] = 1e-9

    def dp_run_config(self, noise_multiplier: float) -> RunConfig:
        """The config of the DP checks: DP-SGD at ``noise_multiplier`` and ``dp_clip_norm``, no budget, secure RNG."""
        return self.run_config(
            noise_multiplier=noise_multiplier, max_grad_norm=self.dp_clip_norm, target_epsilon=None, secure_rng=True
        )

    def heavy_datum(self, backend: MLBackend, text: str = TEXT) -> Datum:
        """A datum whose gradient is far above the clipping norm: every weight multiplied by ``dp_heavy_weight``."""
        datum = self.datum(backend, text)
        weights = [w * self.dp_heavy_weight for w in datum.values("weights", 1.0)]
        return Datum(model_input=datum.model_input, loss_fn_inputs={**datum.loss_fn_inputs, "weights": weights})

    # -- helpers -----------------------------------------------------------------

    def make_dp_backend(self, noise_multiplier: float) -> DPRun:
        config = self.dp_run_config(noise_multiplier)
        assert config.dp.enabled and config.dp.secure_rng, "dp_run_config must enable DP-SGD with dp.secure_rng"
        backend = self.new_backend()
        info = backend.initialize_model(config)
        return DPRun(backend, config, info.trainable_parameters)

    def dp_step(self, run: DPRun, *batches: Sequence[Datum]) -> list[float]:
        """Accumulate ``batches`` (none: an empty Poisson batch), take one DP step, return its noised gradient."""
        for batch in batches:
            run.backend.forward_backward(batch, "cross_entropy")
        run.backend.optim_step(self.adam_params())
        gradient = [float(g) for g in run.backend.noised_gradient()]
        assert len(gradient) == run.parameters, (
            f"noised_gradient() has {len(gradient)} entries but initialize_model reported {run.parameters} "
            "trainable parameters: it must cover every trainable parameter"
        )
        return gradient

    def noise_draws(self, run: DPRun) -> list[float]:
        """The noised gradients of empty steps, at least ``dp_noise_coordinates`` coordinates of them."""
        draws: list[float] = []
        while len(draws) < self.dp_noise_coordinates:
            draws.extend(self.dp_step(run))
        return draws

    def noise_differences(self, first: DPRun, second: DPRun, *batches: Sequence[Datum]) -> list[float]:
        """Coordinate differences of the noised gradients of identical steps on two backends."""
        differences: list[float] = []
        while len(differences) < self.dp_noise_coordinates:
            a, b = self.dp_step(first, *batches), self.dp_step(second, *batches)
            differences.extend(x - y for x, y in zip(a, b, strict=True))
        return differences

    def assert_independent(self, differences: list[float], std: float, what: str) -> None:
        """Differences of two independent noises have variance 2 std^2; any shared noise lowers it."""
        n = len(differences)
        ratio = math.sqrt(sum_of_squares(differences) / (2.0 * n * std * std))
        floor = math.sqrt(variance_ratio_floor(n, self.dp_false_alarm))
        assert ratio >= floor, (
            f"{what}: the noised gradients differ by {ratio:.4g} times what independent noise of std "
            f"sigma * C / B = {std:.6g} gives (independent noise is at least {floor:.4f} times except with "
            f"probability {self.dp_false_alarm:g}; {n} coordinates). The noise must come from a generator seeded "
            "afresh from the OS CSPRNG, whose state is never saved or restored, and be added to every step"
        )

    def assert_clipped(self, run: DPRun, gradient: list[float], data: int, *, exact: bool) -> None:
        """The noised gradient after ``data`` heavy data is at most (``exact``: also at least) data * C / B."""
        bound = data * run.clip / run.batch_size
        slack = bound * self.dp_norm_rtol + norm_ceiling(len(gradient), run.noise_std, self.dp_false_alarm)
        actual = norm(gradient)
        setting = f"C = {run.clip:g}, B = training.batch_size = {run.batch_size}, tolerance {slack:.3g}"
        heavy = f"{data} {'datum' if data == 1 else 'data'} with gradients far above the clipping norm"
        assert actual <= bound + slack, (
            f"{heavy} moved the noised gradient by a norm of {actual:.6g}, but clipping each to C allows at most "
            f"{data} * C / B = {bound:.6g} ({setting}): each datum's gradient must be clipped to dp.max_grad_norm "
            "and the sum divided by the expected batch size"
        )
        if exact:
            assert actual >= bound - slack, (
                f"{heavy} moved the noised gradient by a norm of only {actual:.6g}; clipped to C each and summed "
                f"they give {data} * C / B = {bound:.6g} ({setting}): the backend clips the sum rather than each "
                "datum, shrinks clipped gradients, divides by more than the expected batch size, or the heavy "
                "datum's gradient is not above C (override heavy_datum)"
            )

    # -- the DP-SGD contract -------------------------------------------------------

    @requires_capability(capabilities.DP_SGD)
    def test_dp_sgd_declares_dp_probe(self, backend: MLBackend) -> None:
        assert has(backend, capabilities.DP_PROBE), (
            f"{type(backend).__name__} declares dp_sgd but not dp_probe: implement noised_gradient() and declare "
            "dp_probe, so that the conformance suite can check its clipping and noise (docs/plugins.md, "
            "'Proving DP-SGD')"
        )

    @requires_capability(capabilities.DP_SGD)
    @requires_capability(capabilities.DP_PROBE)
    def test_dp_clips_a_datum_to_the_clipping_norm(self, backend: MLBackend) -> None:
        run = self.make_dp_backend(self.dp_faint_noise_multiplier)
        gradient = self.dp_step(run, [self.heavy_datum(run.backend)])
        self.assert_clipped(run, gradient, 1, exact=True)

    @requires_capability(capabilities.DP_SGD)
    @requires_capability(capabilities.DP_PROBE)
    def test_dp_clips_each_datum_separately(self, backend: MLBackend) -> None:
        # Three copies over two forward_backward calls: per-datum clipping sums to 3 C / B,
        # clipping per call or per batch gives less, no clipping far more.
        run = self.make_dp_backend(self.dp_faint_noise_multiplier)
        heavy = self.heavy_datum(run.backend)
        gradient = self.dp_step(run, [heavy, heavy], [heavy])
        self.assert_clipped(run, gradient, 3, exact=True)

    @requires_capability(capabilities.DP_SGD)
    @requires_capability(capabilities.DP_PROBE)
    def test_dp_bounds_distinct_data_by_their_count(self, backend: MLBackend) -> None:
        run = self.make_dp_backend(self.dp_faint_noise_multiplier)
        gradient = self.dp_step(run, [self.heavy_datum(run.backend, text) for text in TEXTS])
        self.assert_clipped(run, gradient, len(TEXTS), exact=False)

    @requires_capability(capabilities.DP_SGD)
    @requires_capability(capabilities.DP_PROBE)
    def test_dp_empty_step_noise_has_the_calibrated_std(self, backend: MLBackend) -> None:
        # A Poisson-sampled batch can be empty; the step is then the noise alone, at full strength.
        run = self.make_dp_backend(self.dp_noise_multiplier)
        draws = self.noise_draws(run)
        n, std = len(draws), run.noise_std
        ratio = math.sqrt(sum_of_squares(draws) / (n * std * std))
        low, high = (math.sqrt(r) for r in variance_ratio_bounds(n, self.dp_false_alarm))
        assert low <= ratio <= high, (
            f"the noise of empty DP steps has std {ratio * std:.6g}, {ratio:.4g} times sigma * C / B = {std:.6g} "
            f"(sigma = {run.config.dp.noise_multiplier:g}, C = {run.clip:g}, B = training.batch_size = "
            f"{run.batch_size}); honest noise lies within [{low:.4f}, {high:.4f}] times except with probability "
            f"{self.dp_false_alarm:g} ({n} coordinates): every step, an empty one included, must add Gaussian "
            "noise of std noise_multiplier * max_grad_norm before dividing by the expected batch size"
        )

    @requires_capability(capabilities.DP_SGD)
    @requires_capability(capabilities.DP_PROBE)
    def test_dp_noise_is_centred_gaussian(self, backend: MLBackend) -> None:
        run = self.make_dp_backend(self.dp_noise_multiplier)
        draws = self.noise_draws(run)
        n, std = len(draws), run.noise_std
        mean, mean_limit = math.fsum(draws) / n, mean_bound(n, std, self.dp_false_alarm)
        assert abs(mean) <= mean_limit, (
            f"the noise of empty DP steps has mean {mean:.4g}; centred noise of std {std:.6g} stays within "
            f"{mean_limit:.4g} except with probability {self.dp_false_alarm:g} ({n} coordinates)"
        )
        distance, distance_limit = distance_to_normal(draws, std), distribution_bound(n, self.dp_false_alarm)
        assert distance <= distance_limit, (
            f"the noise of empty DP steps is {distance:.4g} away from N(0, {std:.6g}^2) in Kolmogorov distance; "
            f"Gaussian noise stays within {distance_limit:.4g} except with probability {self.dp_false_alarm:g} "
            f"({n} coordinates): the accountant's guarantee holds for Gaussian noise only"
        )

    @requires_capability(capabilities.DP_SGD)
    @requires_capability(capabilities.DP_PROBE)
    def test_dp_fresh_backends_draw_independent_noise(self, backend: MLBackend) -> None:
        first, second = self.make_dp_backend(self.dp_noise_multiplier), self.make_dp_backend(self.dp_noise_multiplier)
        datum = self.datum(first.backend)
        differences = self.noise_differences(first, second, [datum])
        self.assert_independent(
            differences, first.noise_std, "two fresh backends with dp.secure_rng took identical steps on one datum"
        )

    @requires_capability(capabilities.DP_SGD)
    @requires_capability(capabilities.DP_PROBE)
    def test_dp_resumed_backend_draws_fresh_noise(self, backend: MLBackend) -> None:
        original = self.make_dp_backend(self.dp_noise_multiplier)
        self.dp_step(original, [self.datum(original.backend)])
        resumed = self.make_dp_backend(self.dp_noise_multiplier)
        resumed.backend.load_state(original.backend.save_state())
        differences = self.noise_differences(original, resumed)
        self.assert_independent(
            differences,
            original.noise_std,
            "a backend restored from another's save_state took the same empty steps as the original",
        )
