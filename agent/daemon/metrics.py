"""The agent's Prometheus metrics, on a registry of its own (several agents can share a process in tests)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from dynamiccl.labels import size_class
from dynamiccl.schemas import Measurement

# 1 us to about 67 s, doubling: NCCL calls range from a few microseconds to seconds.
LATENCY_BUCKETS = tuple(1e-6 * 2**i for i in range(27))


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.latency = Histogram(
            "dynamiccl_agent_collective_latency_seconds",
            "Mean latency of reported collective calls (one observation per reported measurement)",
            ["collective", "size_class"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.bytes = Counter(
            "dynamiccl_agent_collective_bytes", "Bytes moved by reported calls", ["collective"], registry=r
        )
        self.calls = Counter(
            "dynamiccl_agent_collective_calls", "Reported collective calls", ["collective"], registry=r
        )
        self.received = Counter(
            "dynamiccl_agent_measurements_received", "Measurements received from hooks and readers",
            ["source"], registry=r,
        )
        self.bad_requests = Counter(
            "dynamiccl_agent_bad_requests", "Local API requests refused as malformed", registry=r
        )
        self.spool_depth = Gauge("dynamiccl_agent_spool_depth_batches", "Batches waiting in the spool", registry=r)
        self.spool_bytes = Gauge("dynamiccl_agent_spool_bytes", "Bytes waiting in the spool", registry=r)
        self.spool_dropped = Counter(
            "dynamiccl_agent_spool_dropped_batches",
            "Batches dropped unsent: spool over its bounds or disk full", ["reason"], registry=r,
        )
        self.measurements_refused = Counter(
            "dynamiccl_agent_measurements_refused",
            "Measurements dropped as bad, one by one: at ingest (a config the fabric cannot run) "
            "or by the server (what it still refused once its batch was narrowed down)",
            ["where"], registry=r,
        )
        self.batches_sent = Counter("dynamiccl_agent_batches_sent", "Batches the server accepted", registry=r)
        self.send_failures = Counter(
            "dynamiccl_agent_send_failures", "Failed attempts to send a batch (retried)", registry=r
        )
        self.last_send_success = Gauge(
            "dynamiccl_agent_last_send_success_timestamp_seconds",
            "Unix time of the last batch the server accepted (0: none yet)", registry=r,
        )
        self.jobs_ended = Counter(
            "dynamiccl_agent_jobs_ended", "Jobs `dynamiccl launch` saw end, by whether this agent received "
            "any of their collectives", ["reported"], registry=r,
        )
        self.inspector_unused = Gauge(
            "dynamiccl_agent_inspector_records_unused",
            "NCCL Inspector records read but not used as measurements: malformed, timed on the CPU, or (a "
            "textfile's) run by NCCL with another algorithm and protocol than the job forced",
            ["reason"], registry=r,
        )
        for reason in ("malformed", "cpu_timed", "other_config"):
            self.inspector_unused.labels(reason)  # 0 until an Inspector reader is attached
        self.recommend = Counter(
            "dynamiccl_agent_recommend_answers", "Recommendations answered, by where they came from",
            ["source"], registry=r,
        )

    def observe(self, measurements: Iterable[Measurement]) -> None:
        for m in measurements:
            collective = m.context.collective.value
            self.received.labels(m.source).inc()
            self.latency.labels(collective, size_class(m.context.nbytes)).observe(m.latency_us * 1e-6)
            self.calls.labels(collective).inc(m.count)
            self.bytes.labels(collective).inc(m.context.nbytes * m.count)

    def track_inspector(self, skipped: Callable[[], int], cpu_timed: Callable[[], int],
                        other_config: Callable[[], int]) -> None:
        self.inspector_unused.labels("malformed").set_function(skipped)
        self.inspector_unused.labels("cpu_timed").set_function(cpu_timed)
        self.inspector_unused.labels("other_config").set_function(other_config)

    def track_spool(self, depth: Callable[[], int], size: Callable[[], int]) -> None:
        self.spool_depth.set_function(depth)
        self.spool_bytes.set_function(size)

    def sent(self) -> None:
        self.batches_sent.inc()
        self.last_send_success.set(time.time())

    def render(self) -> bytes:
        return generate_latest(self.registry)
