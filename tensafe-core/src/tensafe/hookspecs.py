"""TenSafe's hook specifications: the whole plugin contract in one module.

Plugins implement these with ``from tensafe import hookimpl``. Hooks fall in two
phases:

* **Registration** hooks are called once per plugin manager when the registry
  is built. Each receives a host-built ``register(name, factory)`` callback; the
  host knows which plugin is calling, so a duplicate name is reported with both
  plugins. ``factory`` is a zero-argument callable returning the object; heavy
  libraries are imported inside it, never when the plugin module is imported.
* **Lifecycle** hooks are called by :class:`tensafe.orchestrator.TenSafeOrchestrator`
  while it works, so an embedding application can observe and veto work.

Every spec is documented in ``docs/hooks.md`` with its exact signature; a test
fails when the two drift apart.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from tensafe.audit import AuditEvent
    from tensafe.config import RunConfig

PROJECT_NAME = "tensafe"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

Register = Callable[[str, Callable[[], Any]], None]
"""The callback passed to registration hooks: ``register(name, factory)``."""


# ---------------------------------------------------------------------------
# Registration: called once per plugin manager, when the registry is built.
# ---------------------------------------------------------------------------


@hookspec
def tensafe_register_ml_backends(register: Register) -> None:
    """Register ML backends (model loading, LoRA training, sampling).

    :param register: ``register(name, factory)``; ``factory()`` returns a fresh
        :class:`tensafe.interfaces.MLBackend`.
    :returns: nothing; results are ignored.

    All implementations are called (results collected and discarded), each with
    a callback bound to its own plugin, when the registry is first built.
    """


@hookspec
def tensafe_register_he_backends(register: Register) -> None:
    """Register homomorphic-encryption backends.

    :param register: ``register(name, factory)``; ``factory()`` returns a fresh
        :class:`tensafe.interfaces.HEBackend`.
    :returns: nothing; results are ignored.

    All implementations are called, each with a callback bound to its own
    plugin, when the registry is first built.
    """


@hookspec
def tensafe_register_accountants(register: Register) -> None:
    """Register privacy accountants.

    :param register: ``register(name, factory)``; ``factory()`` returns a fresh,
        empty :class:`tensafe.interfaces.PrivacyAccountant`.
    :returns: nothing; results are ignored.

    All implementations are called, each with a callback bound to its own
    plugin, when the registry is first built.
    """


@hookspec
def tensafe_register_tgsp_loaders(register: Register) -> None:
    """Register loaders for TGSP adapter packages.

    :param register: ``register(name, factory)``; ``factory()`` returns a
        :class:`tensafe.interfaces.TGSPLoader`.
    :returns: nothing; results are ignored.

    All implementations are called, each with a callback bound to its own
    plugin, when the registry is first built.
    """


@hookspec
def tensafe_register_rewards(register: Register) -> None:
    """Register reward functions for reinforcement learning with verifiable rewards.

    :param register: ``register(name, factory)``; ``factory(**options)`` is
        called with the config term's ``options`` (none by default) and returns a
        :class:`tensafe.interfaces.RewardFunction`.
    :returns: nothing; results are ignored.

    All implementations are called, each with a callback bound to its own
    plugin, when the registry is first built.
    """


@hookspec
def tensafe_register_commands(register: Register) -> None:
    """Register subcommands of the ``tensafe`` CLI.

    :param register: ``register(name, factory)``; ``factory()`` returns a
        :class:`click.Command` (or group) that appears as ``tensafe <name>``.
    :returns: nothing; results are ignored.

    All implementations are called, each with a callback bound to its own
    plugin, when the CLI first lists or resolves its commands. A plugin command
    may not reuse the name of a core command.
    """


# ---------------------------------------------------------------------------
# Lifecycle: called by the orchestrator while it works.
# ---------------------------------------------------------------------------


@hookspec
def tensafe_start_run(run_id: str, config: RunConfig) -> None:
    """A training run is about to start.

    :param run_id: the run's unique identifier.
    :param config: the fully resolved run configuration (read-only by contract).
    :returns: nothing; results are ignored.

    All implementations are called, after the backends are resolved and the
    model is initialised, before the first step. An exception aborts the run.
    """


@hookspec
def tensafe_approve_step(run_id: str, step: int, batch_size: int) -> str | None:
    """Approve or veto the next optimizer step before any work is done for it.

    :param run_id: the run's unique identifier.
    :param step: the number the step will have once taken (the first is 1).
    :param batch_size: the number of records in the step's batch; under DP the expected batch size
        (``training.batch_size``), since a Poisson batch's realised size is private.
    :returns: ``None`` to approve, or a human-readable reason to veto.

    All implementations are called and their results collected; if any returns
    a reason, the step does not run and the orchestrator raises
    :class:`tensafe.errors.StepVetoed` with every reason given.
    """


@hookspec
def tensafe_report_step(run_id: str, step: int, metrics: dict[str, float]) -> None:
    """An optimizer step has been taken.

    :param run_id: the run's unique identifier.
    :param step: the step just taken (the first is 1).
    :param metrics: what the release gate releases of the step: without DP every metric (e.g.
        ``loss``); under DP only ``epsilon`` (and ``epoch`` for RL steps).
    :returns: nothing; results are ignored.

    All implementations are called, after the step's results (and privacy
    spend) are final.
    """


@hookspec
def tensafe_warn_budget(run_id: str, epsilon: float, delta: float, target_epsilon: float) -> None:
    """The run has spent the configured share (``dp.warn_fraction``) of its privacy budget.

    :param run_id: the run's unique identifier.
    :param epsilon: epsilon spent so far.
    :param delta: the run's delta.
    :param target_epsilon: the budget.
    :returns: nothing; results are ignored.

    All implementations are called, once per run, right after the step that
    crossed the threshold has been reported.
    """


@hookspec
def tensafe_finish_run(run_id: str, report: dict[str, Any]) -> None:
    """A training run has ended, successfully or not.

    :param run_id: the run's unique identifier.
    :param report: the run report; ``report["status"]`` is ``"completed"`` or
        ``"failed"`` (then ``report["error"]`` holds the message).
    :returns: nothing; results are ignored.

    All implementations are called exactly once per started run.
    """


@hookspec
def tensafe_record_audit(event: AuditEvent) -> None:
    """An auditable event happened (run started, step taken, artifact written, ...).

    :param event: the event, with its operation, subject, details and time.
    :returns: nothing; results are ignored.

    All implementations are called, synchronously, in the order events happen.
    """
