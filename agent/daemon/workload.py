"""What each job runs: the distinct contexts its hooks reported, weighted by call rate.

`/local/v1/recommend` without contexts asks the server about this workload.
A weight is calls per second over the span the agent has seen the job, which
ranks the contexts the way "calls per step" would (the server only compares
weights). Memory is bounded: the most recently active jobs, and per job the
most frequent contexts up to the API's limit.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from dynamiccl.schemas import MAX_CONTEXTS, Context, Measurement, WeightedContext

DEFAULT_MAX_JOBS = 1_000
_MAX_WEIGHT = 1e12


@dataclass
class _Job:
    first_seen: float
    last_seen: float
    calls: dict[Context, int] = field(default_factory=dict)
    measurements: int = 0
    total_calls: int = 0


@dataclass(frozen=True)
class JobSummary:
    """What the agent has received from a job: measurements, the calls they cover, kinds of call."""

    measurements: int = 0
    calls: int = 0
    contexts: int = 0


class WorkloadRecorder:
    def __init__(
        self,
        max_jobs: int = DEFAULT_MAX_JOBS,
        max_contexts: int = MAX_CONTEXTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_jobs = max_jobs
        self.max_contexts = max_contexts
        self._clock = clock
        self._jobs: OrderedDict[str, _Job] = OrderedDict()
        self._lock = threading.Lock()

    def record(self, measurements: Iterable[Measurement]) -> None:
        now = self._clock()
        with self._lock:
            for m in measurements:
                if m.job_id is None:
                    continue
                job = self._jobs.get(m.job_id)
                if job is None:
                    job = self._jobs[m.job_id] = _Job(first_seen=now, last_seen=now)
                    if len(self._jobs) > self.max_jobs:
                        self._jobs.popitem(last=False)
                self._jobs.move_to_end(m.job_id)
                job.last_seen = now
                job.measurements += 1
                job.total_calls += m.count
                job.calls[m.context] = job.calls.get(m.context, 0) + m.count
                if len(job.calls) > 2 * self.max_contexts:
                    # Trim to the most frequent: a rare context matters least to one process-wide env.
                    top = sorted(job.calls.items(), key=lambda kv: kv[1], reverse=True)
                    job.calls = dict(top[: self.max_contexts])

    def contexts(self, job_id: str) -> list[WeightedContext]:
        """The job's workload, most frequent first; empty if the agent has seen nothing of it."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return []
            span = max(job.last_seen - job.first_seen, 1.0)
            top = sorted(job.calls.items(), key=lambda kv: kv[1], reverse=True)[: self.max_contexts]
        return [
            ctx.weighted(min(calls / span, _MAX_WEIGHT)) for ctx, calls in top
        ]

    def summary(self, job_id: str) -> JobSummary:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return JobSummary()
            return JobSummary(measurements=job.measurements, calls=job.total_calls, contexts=len(job.calls))
