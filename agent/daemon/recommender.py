"""Answers `/local/v1/recommend`: the server's pinned answer for a job, or a safe fallback.

Order: the server (asked with the job id, so every node of the job gets the
answer the server pinned for it; each good answer is cached on disk), else
that job's cached pinned answer, else the NCCL default (empty env, no rules).
Never another job's answer or a local guess: nodes of one job must agree.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import httpx

from dynamiccl.agent.daemon.reco_cache import RecommendationCache
from dynamiccl.agent.daemon.workload import WorkloadRecorder
from dynamiccl.agent_api import DEFAULT_ANSWER, Answer
from dynamiccl.client import ApiError, DynamicclClient
from dynamiccl.schemas import WeightedContext

log = logging.getLogger("dynamiccl.agent.recommend")


class Recommender:
    def __init__(
        self,
        client: DynamicclClient,
        fabric_id: str,
        cache: RecommendationCache,
        workload: WorkloadRecorder,
        on_unknown_fabric: Callable[[], None] | None = None,
    ) -> None:
        self.client = client
        self.fabric_id = fabric_id
        self.cache = cache
        self.workload = workload
        self._on_unknown_fabric = on_unknown_fabric

    def recommend(
        self, job_id: str, contexts: Sequence[WeightedContext] | None, refresh: bool = False
    ) -> Answer:
        if contexts is None:
            contexts = self.workload.contexts(job_id)
            if not contexts:
                # Nothing to ask about; a pinned answer (another node asked) still keeps nodes in step.
                return self._fallback(job_id, "no workload recorded for this job")
        try:
            answer = self.client.recommend(self.fabric_id, contexts, job_id=job_id, refresh=refresh)
        except (ApiError, httpx.HTTPError, ValueError) as error:
            if isinstance(error, ApiError) and error.status_code == 404 and self._on_unknown_fabric:
                self._on_unknown_fabric()
            log.warning("recommend for job %s: server unavailable: %s", job_id, error)
            return self._fallback(job_id, f"server unavailable ({error})")
        try:
            self.cache.put(self.fabric_id, job_id, answer)
        except OSError as error:  # a full disk must not cost the caller the answer it got
            log.warning("could not cache the recommendation for job %s: %s", job_id, error)
        return Answer(answer, "server", "the server's pinned recommendation for this job")

    def _fallback(self, job_id: str, why: str) -> Answer:
        cached = self.cache.get(self.fabric_id, job_id)
        if cached is not None:
            return Answer(cached, "cache", f"{why}; serving this job's pinned recommendation from the cache")
        return Answer(DEFAULT_ANSWER, "default", f"{why}; no pinned recommendation cached: NCCL default")
