"""The server's Prometheus metrics (`dynamiccl_` prefix, base units), one registry per app."""

from __future__ import annotations

import time
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dynamiccl.labels import size_class
from dynamiccl.nccl.cost_model import bus_factor
from dynamiccl.schemas import Measurement

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def config_kind(measurement: Measurement) -> str:
    """`default` (NCCL decides), `suggested` (a config tried on a suggestion) or `tuned` (any other
    config: a job running its recommendation or a hand-set NCCL environment)."""
    if measurement.config.is_default:
        return "default"
    return "suggested" if measurement.suggestion_id else "tuned"


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "dynamiccl_http_requests", "HTTP requests by route template, method and status.",
            ["route", "method", "status"], registry=r,
        )
        self.request_duration = Histogram(
            "dynamiccl_http_request_duration_seconds", "HTTP request latency by route template.",
            ["route", "method"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.measurements_ingested = Counter(
            "dynamiccl_measurements_ingested", "Measurements stored.", registry=r
        )
        self.batches = Counter(
            "dynamiccl_batches", "Measurement batches by result (accepted, duplicate, rejected).",
            ["result"], registry=r,
        )
        self.suggestions = Counter(
            "dynamiccl_suggestions", "Suggestions by kind (explore, exploit, default).", ["kind"], registry=r
        )
        self.exploration_share = Gauge(
            "dynamiccl_exploration_share", "Share of explore suggestions in the last suggest call.", registry=r
        )
        self.fabrics = Gauge("dynamiccl_fabrics", "Fabrics known.", registry=r)
        self.contexts = Gauge("dynamiccl_contexts", "Distinct contexts measured, per fabric.", ["fabric"], registry=r)
        self.predicted_speedup = Gauge(
            "dynamiccl_predicted_speedup",
            "Weighted geometric-mean predicted speedup of the last recommendation, per fabric.",
            ["fabric"], registry=r,
        )
        self.refit_duration = Histogram(
            "dynamiccl_refit_duration_seconds", "Duration of one learner refit.",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.compacted = Counter(
            "dynamiccl_measurements_compacted", "Measurements older than retention compacted into counts, per fabric.",
            ["fabric"], registry=r,
        )
        self.observe_errors = Counter(
            "dynamiccl_observe_errors", "Errors while handing stored batches to the learner.", registry=r
        )
        self.configs_withdrawn = Gauge(
            "dynamiccl_configs_withdrawn", "(context, config) pairs the evidence rates faster than NCCL's "
            "default but that a source ran slower: withdrawn from recommendation, per fabric.",
            ["fabric"], registry=r,
        )
        self.learner_behind = Counter(
            "dynamiccl_learner_behind", "suggest and recommend answers given before the learner had "
            "taken in every batch stored before them (marked learner.behind).", registry=r
        )

        measured = ["fabric", "collective", "size_class", "config"]
        self.measured_calls = Counter(
            "dynamiccl_measured_calls", "Collective calls in stored measurements, by config kind "
            "(default, suggested, tuned).", measured, registry=r,
        )
        self.measured_seconds = Counter(
            "dynamiccl_measured_call_seconds", "Time those calls took (latency times count): divided by "
            "the calls it is the mean latency.", measured, registry=r,
        )
        self.measured_bus_bytes = Counter(
            "dynamiccl_measured_bus_bytes", "Bytes of those calls times nccl-tests' bus factor: divided by "
            "the seconds it is the bus bandwidth.", measured, registry=r,
        )

    def observe_measured(self, fabric_id: str, measurements: Iterable[Measurement]) -> None:
        """Count a stored batch's calls, time and bus bytes per (collective, size class, config kind)."""
        by_call: dict[tuple, list] = {}  # sums per kind of call first: a batch repeats a few of them
        for m in measurements:
            key = (m.context.collective, m.context.nbytes, m.context.nranks, config_kind(m))
            if (sums := by_call.get(key)) is None:
                sums = by_call[key] = [m.context, 0, 0.0]
            sums[1] += m.count
            sums[2] += m.latency_us * 1e-6 * m.count
        totals: dict[tuple[str, str, str], list[float]] = {}
        for (collective, nbytes, _, kind), (context, count, seconds) in by_call.items():
            sums = totals.setdefault((collective.value, size_class(nbytes), kind), [0.0, 0.0, 0.0])
            sums[0] += count
            sums[1] += seconds
            sums[2] += nbytes * bus_factor(context.collective, context.nranks) * count
        for (collective, size, kind), (calls, seconds, bus_bytes) in totals.items():
            self.measured_calls.labels(fabric_id, collective, size, kind).inc(calls)
            self.measured_seconds.labels(fabric_id, collective, size, kind).inc(seconds)
            self.measured_bus_bytes.labels(fabric_id, collective, size, kind).inc(bus_bytes)

    def observe_refit(self, seconds: float) -> None:
        self.refit_duration.observe(seconds)

    def observe_compaction(self, fabric_id: str, rows: int) -> None:
        self.compacted.labels(fabric_id).inc(rows)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestMetrics:
    """ASGI middleware: counts and times every HTTP request by route template (never the raw
    path: label cardinality stays bounded), method and status."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500

        async def sent(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sent)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")  # the router records what it matched
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            if route == "/v1/measurements" and 400 <= status < 500:  # refused whole, nothing stored
                self.metrics.batches.labels("rejected").inc()
            self.metrics.request_duration.labels(route, scope["method"]).observe(time.perf_counter() - started)
