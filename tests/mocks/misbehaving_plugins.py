"""Plugins that misbehave: module sources to install with ``make_distribution``, and plugin objects.

Each source imports only :mod:`tensafe`, like a real plugin module. The
accountant they register charges ``q / sigma`` per step (see
:mod:`tests.mocks.accountants`): not a DP accountant, only something valid to register.
"""

from __future__ import annotations

from tensafe import hookimpl
from tensafe.hookspecs import Register
from tests.mocks.accountants import LinearTestAccountant


class BrokenAccountant(LinearTestAccountant):
    """Composes steps, then fails with a plain exception when asked for epsilon."""

    def get_epsilon(self, delta: float) -> float:
        raise ValueError("no orders converged")


class BrokenAccountantPlugin:
    @hookimpl
    def tensafe_register_accountants(self, register: Register) -> None:
        register("broken", BrokenAccountant)


_ACCOUNTANT = """
from tensafe import hookimpl
from tensafe.interfaces import PrivacyAccountant


class LinearAccountant(PrivacyAccountant):
    def __init__(self):
        self._epsilon, self._steps = 0.0, 0

    def compose_step(self, sampling_rate, noise_multiplier, count=1):
        self._epsilon += count * sampling_rate / noise_multiplier
        self._steps += count

    def get_epsilon(self, delta):
        return self._epsilon

    def get_delta(self, epsilon):
        return 0.0 if epsilon >= self._epsilon else 1.0

    @property
    def steps(self):
        return self._steps

    def calibrate_noise_multiplier(self, target_epsilon, delta, sampling_rate, steps):
        return steps * sampling_rate / target_epsilon

    def state(self):
        return {"epsilon": self._epsilon, "steps": self._steps}

    def load_state(self, state):
        self._epsilon, self._steps = float(state["epsilon"]), int(state["steps"])


class HalfAccountant(PrivacyAccountant):
    def compose_step(self, sampling_rate, noise_multiplier, count=1):
        pass
"""

#: Registers ``twin`` (also taken by :data:`TWIN_B`) and ``linear-a``, which is its alone.
TWIN_A = (
    _ACCOUNTANT
    + """
@hookimpl
def tensafe_register_accountants(register):
    register("twin", LinearAccountant)
    register("linear-a", LinearAccountant)
"""
)

#: Registers ``twin`` (also taken by :data:`TWIN_A`) and ``linear-b``.
TWIN_B = (
    _ACCOUNTANT
    + """
@hookimpl
def tensafe_register_accountants(register):
    register("twin", LinearAccountant)
    register("linear-b", LinearAccountant)
"""
)

#: A second ``rdp``, next to tensafe-privacy's; ``linear`` is fine.
SECOND_RDP = (
    _ACCOUNTANT
    + """
@hookimpl
def tensafe_register_accountants(register):
    register("rdp", LinearAccountant)
    register("linear", LinearAccountant)
"""
)

#: An abstract class and a class that is not an accountant, next to a good registration.
WRONG_CLASSES = (
    _ACCOUNTANT
    + """
@hookimpl
def tensafe_register_accountants(register):
    register("half", HalfAccountant)
    register("dict", dict)
    register("sound", LinearAccountant)
"""
)

#: Factories that fail when called: a lazy import that is missing, a constructor that raises.
FAILING_FACTORIES = (
    _ACCOUNTANT
    + """
class ExplodingAccountant(LinearAccountant):
    def __init__(self):
        raise RuntimeError("the accountant's licence server is unreachable")


def lazy_backend():
    import tensafe_no_such_dependency  # noqa: F401

    raise AssertionError("unreachable")


@hookimpl
def tensafe_register_accountants(register):
    register("exploding", ExplodingAccountant)


@hookimpl
def tensafe_register_ml_backends(register):
    register("lazy", lazy_backend)
"""
)

#: A lifecycle hook that prints to standard output, as the README's example does.
PRINTING_OBSERVER = """
from tensafe import hookimpl


@hookimpl
def tensafe_report_step(step, metrics):
    print(f"observer: step {step}")


@hookimpl
def tensafe_finish_run(report):
    print("observer: finished")
"""
