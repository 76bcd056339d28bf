"""The server's Prometheus metrics (`dynamiccl_` prefix, base units), one registry per app."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


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
        self.observe_errors = Counter(
            "dynamiccl_observe_errors", "Errors while handing stored batches to the learner.", registry=r
        )

    def observe_refit(self, seconds: float) -> None:
        self.refit_duration.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
