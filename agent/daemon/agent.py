"""The node agent: wires spool, aggregator, sender, registrar, recommender and the Inspector follower.

Plugin-mode jobs registered by the launcher are tuned online by
`OnlineJobs` (plugin/online.py): a rules section per tuning round.

Data path: local API or Inspector -> `Agent.ingest` -> aggregator (memory, one
window) -> spool (disk) -> sender -> server. Whatever reached the spool
survives agent crashes and server outages; what is still in the current
window is lost only if the agent dies uncleanly (a clean stop spools it).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from dynamiccl.agent.daemon.aggregator import DEFAULT_WINDOW_S, Aggregator
from dynamiccl.agent.daemon.inspector import InspectorFollower, InspectorReader
from dynamiccl.agent.daemon.metrics import AgentMetrics
from dynamiccl.agent.daemon.reco_cache import RecommendationCache
from dynamiccl.agent.daemon.recommender import Recommender
from dynamiccl.agent.daemon.registrar import Registrar
from dynamiccl.agent.daemon.sender import Sender
from dynamiccl.agent.daemon.spool import DEFAULT_MAX_BATCHES, DEFAULT_MAX_BYTES, Spool
from dynamiccl.agent.daemon.workload import JobSummary, WorkloadRecorder
from dynamiccl.agent.plugin.online import OnlineJobs
from dynamiccl.agent_api import Answer
from dynamiccl.client import DynamicclClient
from dynamiccl.nccl.space import InvalidConfig, check_config
from dynamiccl.schemas import DEFAULT_CONFIG, Fabric, Measurement, NcclConfig, WeightedContext

log = logging.getLogger("dynamiccl.agent")


@dataclass(frozen=True)
class Refused:
    """A measurement the agent would not take: its index in what was handed in, and why."""

    index: int
    reason: str


@dataclass(frozen=True)
class Ingested:
    accepted: int
    refused: tuple[Refused, ...] = ()


@dataclass(frozen=True)
class AgentConfig:
    server: str
    fabric_id: str
    fabric: Fabric
    spool_dir: Path
    token: str | None = None
    window_s: float = DEFAULT_WINDOW_S
    inspector_dir: Path | None = None
    inspector_config: NcclConfig = DEFAULT_CONFIG  # the NCCL config the Inspector-observed job runs
    inspector_job_id: str | None = None
    inspector_interval_s: float = 1.0
    max_spool_bytes: int = DEFAULT_MAX_BYTES
    max_spool_batches: int = DEFAULT_MAX_BATCHES
    max_backoff_s: float = 30.0
    online_interval_s: float = 1.0  # how often plugin-mode jobs are checked for a due tuning round
    rules_dir: Path | None = None  # where plugin-mode jobs' rules files live (default: spool_dir/rules)


class Agent:
    def __init__(self, config: AgentConfig, transport: httpx.BaseTransport | None = None) -> None:
        """`transport` replaces the network for tests (e.g. httpx.MockTransport)."""
        self.config = config
        self.metrics = AgentMetrics()
        self.spool = Spool(
            config.spool_dir / "spool.db",
            max_bytes=config.max_spool_bytes,
            max_batches=config.max_spool_batches,
            on_drop=self.metrics.spool_dropped.labels("spool").inc,
        )
        self.metrics.track_spool(self.spool.depth, self.spool.size_bytes)
        self._clients = [
            DynamicclClient(config.server, config.token, timeout=10.0, attempts=1, transport=transport),
            DynamicclClient(config.server, config.token, timeout=10.0, attempts=1, transport=transport),
            DynamicclClient(config.server, config.token, timeout=5.0, attempts=2, max_backoff=1.0,
                            transport=transport),
        ]
        send_client, register_client, query_client = self._clients
        self.registrar = Registrar(register_client, config.fabric_id, config.fabric,
                                   max_backoff=config.max_backoff_s)
        self.sender = Sender(
            self.spool,
            send_client,
            max_backoff=config.max_backoff_s,
            on_sent=lambda _batch: self.metrics.sent(),
            on_failure=self.metrics.send_failures.inc,
            on_refused=self.metrics.measurements_refused.labels("server").inc,
            on_unknown_fabric=self.registrar.request,
        )
        self.aggregator = Aggregator(
            self.spool, config.fabric_id, window_s=config.window_s, on_flush=lambda _n: self.sender.notify()
        )
        self.workload = WorkloadRecorder()
        self.recommender = Recommender(
            query_client,
            config.fabric_id,
            RecommendationCache(config.spool_dir / "recommendations"),
            self.workload,
            on_unknown_fabric=self.registrar.request,
        )
        self.online = OnlineJobs(
            query_client,
            config.fabric_id,
            lambda job_id: self.workload.contexts(job_id),
            self.metrics.registry,
            rules_dir=config.rules_dir or config.spool_dir / "rules",
            interval_s=config.online_interval_s,
            on_unknown_fabric=self.registrar.request,
        )
        self.inspector: InspectorFollower | None = None
        if config.inspector_dir is not None:
            reader = InspectorReader(
                config.inspector_dir,
                config.spool_dir / "inspector-state.json",
                config=config.inspector_config,
                job_id=config.inspector_job_id,
            )
            self.inspector = InspectorFollower(reader, self.ingest, interval_s=config.inspector_interval_s)
            self.metrics.track_inspector(lambda: reader.skipped, lambda: reader.cpu_timed,
                                         lambda: reader.other_config)
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="dynamiccl-window", daemon=True)

    def start(self) -> None:
        log.info(
            "agent %s for fabric %s, server %s, spool %s (%d batches waiting)",
            self.spool.agent_id, self.config.fabric_id, self.config.server,
            self.config.spool_dir, self.spool.depth(),
        )
        self.registrar.start()
        self.sender.start()
        self._ticker.start()
        self.online.start()
        if self.inspector is not None:
            self.inspector.start()

    def stop(self) -> None:
        """Stop reading, spool the open window, stop sending; unsent batches stay on disk."""
        self._stop.set()
        if self.inspector is not None:
            self.inspector.stop()
        if self._ticker.is_alive():
            self._ticker.join(5.0)
        self.online.stop()
        self.aggregator.flush()
        self.sender.stop()
        self.registrar.stop()
        for client in self._clients:
            client.close()
        self.spool.close()

    def _tick(self) -> None:
        interval = min(max(self.config.window_s / 4, 0.05), 1.0)
        while not self._stop.wait(interval):
            try:
                self.aggregator.tick()
            except Exception:  # e.g. an unwritable spool: keep the thread, the next window may fit
                log.exception("spooling a window failed")

    def ingest(self, measurements: Sequence[Measurement], job_id: str | None = None) -> Ingested:
        """Take measurements from a hook or reader; `job_id` fills in where a measurement has none.

        Each is checked against the fabric's config space here, one by one: a measurement of a config
        this fabric cannot run would make the server refuse the whole batch it travels in, so it is
        refused (and counted) now and the others are taken.
        """
        taken: list[Measurement] = []
        refused: list[Refused] = []
        for index, measurement in enumerate(measurements):
            try:
                check_config(self.config.fabric, measurement.context, measurement.config)
            except InvalidConfig as error:
                refused.append(Refused(index, str(error)))
                continue
            if job_id is not None and not measurement.job_id:
                measurement = measurement.model_copy(update={"job_id": job_id})
            taken.append(measurement)
        if refused:
            self.metrics.measurements_refused.labels("agent").inc(len(refused))
            log.warning("refused %d of %d measurements (first: #%d, %s)",
                        len(refused), len(measurements), refused[0].index, refused[0].reason)
        self.metrics.observe(taken)
        self.workload.record(taken)
        self.aggregator.add(taken)
        return Ingested(accepted=len(taken), refused=tuple(refused))

    def recommend(self, job_id: str, contexts: Sequence[WeightedContext] | None, refresh: bool) -> Answer:
        answer = self.recommender.recommend(job_id, contexts, refresh)
        self.metrics.recommend.labels(answer.source).inc()
        return answer

    def job_ended(self, job_id: str) -> JobSummary:
        """A launch says its job is over: what this agent received from it (counted if nothing)."""
        summary = self.workload.summary(job_id)
        self.metrics.jobs_ended.labels("yes" if summary.measurements else "no").inc()
        return summary

    def health(self) -> dict[str, object]:
        return {
            "status": "ok",
            "agent_id": self.spool.agent_id,
            "fabric_id": self.config.fabric_id,
            "registered": self.registrar.registered.is_set(),
            "spool_depth": self.spool.depth(),
            "last_send_success": self.sender.last_success,
        }
