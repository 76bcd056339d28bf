"""Hands the hook's windows to the local agent, off the training thread.

A daemon thread wakes every `window_s`, takes the call table and posts it to
`POST /local/v1/measurements`. When the agent is unreachable the
measurements wait in a bounded backlog (oldest dropped first, and counted);
nothing here ever blocks or raises into training. A final flush at
interpreter exit gets a short, fixed time budget.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from dynamiccl.agent_api import AgentUrl
from dynamiccl.agent_client import AgentClient
from dynamiccl.schemas import MAX_BATCH_MEASUREMENTS

log = logging.getLogger("dynamiccl.hook")


@dataclass
class PosterStats:
    posted: int = 0  # measurements the agent accepted
    dropped: int = 0  # measurements dropped from a full backlog
    failures: int = 0  # posts that failed (agent down, refused, timed out)
    unattributed: int = 0  # cells that could not become a Measurement


class Poster:
    def __init__(
        self,
        agent_url: str,
        job_id: str | None,
        collect: Callable[[], list[dict[str, Any]]],
        window_s: float = 5.0,
        backlog_max: int = 20_000,
        timeout_s: float = 2.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        AgentUrl.parse(agent_url)  # a malformed address is refused here, not in the posting thread
        self.url = agent_url
        self.job_id = job_id
        self.window_s = window_s
        self.stats = PosterStats()
        self._collect = collect
        self._timeout_s = timeout_s
        self._transport = transport
        self._backlog: deque[dict[str, Any]] = deque()
        self._backlog_max = backlog_max
        self._send_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._warned = False

    @property
    def backlog(self) -> int:
        return len(self._backlog)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="dynamiccl-hook-poster", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with self._client(self._timeout_s) as client:
            while not self._stop.wait(self.window_s):
                self.flush(client)

    def _client(self, timeout_s: float) -> AgentClient:
        return AgentClient(self.url, timeout=timeout_s, transport=self._transport)

    def flush(self, client: AgentClient | None = None, deadline: float | None = None) -> None:
        """Collect the current window and post everything pending; never raises."""
        if os.getpid() != self._pid:  # a forked child (e.g. a DataLoader worker) posts nothing
            return
        try:
            if not self._send_lock.acquire(timeout=self._timeout_s):
                return
            try:
                self._enqueue(self._collect())
                if client is None:
                    with self._client(self._timeout_s) as own:
                        self._drain(own, deadline)
                else:
                    self._drain(client, deadline)
            finally:
                self._send_lock.release()
        except Exception as error:  # noqa: BLE001 - the profiler must never take the job down
            self.stats.failures += 1
            log.debug("dynamiccl hook: flush failed: %s", error)

    def _enqueue(self, measurements: list[dict[str, Any]]) -> None:
        self._backlog.extend(measurements)
        overflow = len(self._backlog) - self._backlog_max
        for _ in range(max(0, overflow)):
            self._backlog.popleft()
        self.stats.dropped += max(0, overflow)

    def _drain(self, client: AgentClient, deadline: float | None) -> None:
        while self._backlog and (deadline is None or time.monotonic() < deadline):
            batch = [self._backlog[i] for i in range(min(len(self._backlog), MAX_BATCH_MEASUREMENTS))]
            try:
                delivery = client.post_measurements(self.job_id, batch)
            except httpx.HTTPError as error:
                self._failed(f"agent unreachable at {self.url} ({error.__class__.__name__})")
                return
            self.stats.posted += delivery.accepted
            if delivery.refused:
                # A refused batch would be refused again: drop it rather than wedge the backlog.
                # A 422 may still have taken the valid measurements.
                self._failed(f"agent refused {delivery.refused} of {len(batch)} measurements: {delivery.reason}")
                self.stats.dropped += delivery.refused
            for _ in batch:
                self._backlog.popleft()

    def _failed(self, why: str) -> None:
        self.stats.failures += 1
        if not self._warned:
            self._warned = True
            print(f"dynamiccl hook: {why}; keeping up to {self._backlog_max} measurements", file=sys.stderr)

    def stop(self) -> None:
        """Stop the thread without a last flush (what is pending is dropped with the process)."""
        self._stop.set()

    def close(self, timeout_s: float = 1.5) -> None:
        """Stop the thread and make one last, time-bounded flush (atexit)."""
        deadline = time.monotonic() + timeout_s
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=max(0.0, deadline - time.monotonic()))
        remaining = max(0.05, deadline - time.monotonic())
        self._timeout_s = min(self._timeout_s, remaining)
        self.flush(deadline=deadline)

