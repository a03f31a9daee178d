"""Prometheus metrics at ``/metrics``: requests, latencies, queued work, optimizer steps, epsilon per tenant.

Every metric lives in one :class:`prometheus_client.CollectorRegistry` owned by
the app (never the process-global default, so two apps in one process keep
apart). ``/metrics`` needs no API key, like ``/healthz``, so it holds nothing
computed from a tenant's data: no losses, no batch sizes, no names. Requests
are labelled by route template (``/api/v1/training/{session_id}``), never by
the path a client sent; tenants by id. Queued work and epsilon are read from
the database at each scrape, so every replica over one database reports the
same totals (aggregate them with ``max``, not ``sum``); requests and steps are
counted by the replica that served or ran them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tensafe import hookimpl
from tensafe.server.db import FutureRow, SessionRow

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from tensafe.plugins import TensafePluginManager

#: Futures in these states are still to run.
UNFINISHED = ("queued", "running")
#: The route label of a request that matched no route (its path is not used: it would be unbounded).
UNMATCHED = "<unmatched>"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class DatabaseCollector(Collector):
    """Gauges read from the database at each scrape: unfinished operations, epsilon spent per tenant."""

    def __init__(self, db: Callable[[], AbstractContextManager[Session]]) -> None:
        self.db = db

    def collect(self) -> Iterator[Metric]:
        operations = GaugeMetricFamily(
            "tensafe_operations",
            "Operations (forward_backward, optim_step, train_step) not yet finished",
            labels=["state"],
        )
        epsilon = GaugeMetricFamily(
            "tensafe_tenant_epsilon_spent",
            "Sum of the epsilon spent by the tenant's training sessions (by tenant id)",
            labels=["tenant_id"],
        )
        try:
            with self.db() as db:
                by_state = dict(
                    db.execute(
                        select(FutureRow.status, func.count())
                        .where(FutureRow.status.in_(UNFINISHED))
                        .group_by(FutureRow.status)
                    ).all()
                )
                spent = db.execute(
                    select(SessionRow.tenant_id, func.sum(SessionRow.epsilon))
                    .where(SessionRow.epsilon.is_not(None))
                    .group_by(SessionRow.tenant_id)
                ).all()
                for tenant_id, total in spent:
                    epsilon.add_metric([tenant_id], float(total or 0.0))
        except SQLAlchemyError:
            return  # a database that does not answer: /readyz says so; these gauges are left out
        for state in UNFINISHED:
            operations.add_metric([state], float(by_state.get(state, 0)))
        yield operations
        yield epsilon


class StepCounter:
    """A plugin counting the optimizer steps this process takes (``tensafe_report_step``; the step only)."""

    def __init__(self, counter: Counter) -> None:
        self.counter = counter

    @hookimpl
    def tensafe_report_step(self) -> None:
        self.counter.inc()


class ServerMetrics:
    """The app's registry and the metrics in it."""

    def __init__(self, db: Callable[[], AbstractContextManager[Session]], pm: TensafePluginManager) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "tensafe_http_requests",
            "HTTP requests answered, by method, route template and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "tensafe_http_request_duration_seconds",
            "Time to answer an HTTP request, by method, route template and status",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.steps = Counter(
            "tensafe_optimizer_steps", "Optimizer steps taken by this server process", registry=self.registry
        )
        self.registry.register(DatabaseCollector(db))
        # Registered for the app's lifetime: the plugin manager belongs to the service the app serves.
        pm.register(StepCounter(self.steps), name=f"tensafe-server-metrics-{id(self)}")

    def exposition(self) -> tuple[bytes, str]:
        """The metrics in Prometheus' text format, and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route, str(status)).observe(seconds)


def route_template(scope: Scope) -> str:
    """The template of the route a request matched (set by the router), or :data:`UNMATCHED`."""
    route: Any = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED


class RequestMetrics:
    """ASGI middleware: counts and times each HTTP request by method, route template and status."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def sent(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sent)
        finally:
            self.metrics.observe(scope["method"], route_template(scope), status, time.perf_counter() - started)
