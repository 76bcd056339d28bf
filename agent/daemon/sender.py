"""Background thread that drains the spool to the server, oldest batch first.

A batch is acked (deleted from the spool) only once the server answered 202,
a duplicate included: the batch id is the batch's own, so a retry after a lost
response is recognised by the server and counts nothing twice. Failures back
off exponentially with jitter.

A batch the server refuses as bad (422, 413, other 4xx) is narrowed down
rather than dropped: the measurements a 422 names are dropped, and the rest is
sent again as a batch of its own; a refusal that names none splits the batch in
halves, down to single measurements. Only what the server still refuses on its
own is dropped, counted and logged with the server's reason, so one bad
measurement cannot take honest ones with it, nor block the queue. The parts'
batch ids derive from the batch's, so a narrowing interrupted by an outage and
redone later stores nothing twice. Refusals that are not about the batch are
retried instead: 408/429 (load), 401/403 (the token: every batch would fail
alike until it is fixed) and 404 (the fabric is unknown to the server, e.g. its
database was reset: the agent registers it again).
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence

import httpx

from dynamiccl.agent.daemon.spool import Spool, SpooledBatch
from dynamiccl.client import ApiError, DynamicclClient
from dynamiccl.schemas import Measurement

log = logging.getLogger("dynamiccl.agent.daemon.sender")

RETRIED_4XX = frozenset({401, 403, 404, 408, 429})


def part_id(batch_id: str, part: str) -> str:
    """The batch id of one part of a narrowed batch: the same on every attempt, within the id limit."""
    digest = hashlib.blake2b(f"{batch_id}|{part}".encode(), digest_size=8).hexdigest()
    return f"{batch_id[:100]}~{digest}"


def named_measurements(detail: object, size: int) -> set[int]:
    """Indices of measurements a 422's detail names (`loc` body, measurements, i, ...)."""
    named: set[int] = set()
    for error in detail if isinstance(detail, list) else ():
        loc = error.get("loc") if isinstance(error, dict) else None
        if isinstance(loc, list | tuple) and len(loc) >= 3 and list(loc[:2]) == ["body", "measurements"]:
            index = loc[2]
            if isinstance(index, int) and 0 <= index < size:
                named.add(index)
    return named


def backoff_delay(failures: int, base: float, cap: float) -> float:
    """Equal jitter: uniform between half of the exponentially growing ceiling and the ceiling."""
    ceiling = min(cap, base * 2 ** min(failures, 32))
    return random.uniform(ceiling / 2, ceiling)


class Sender:
    def __init__(
        self,
        spool: Spool,
        client: DynamicclClient,
        batch_size: int = 16,
        base_backoff: float = 0.5,
        max_backoff: float = 30.0,
        idle_poll: float = 1.0,
        on_sent: Callable[[SpooledBatch], None] | None = None,
        on_failure: Callable[[], None] | None = None,
        on_refused: Callable[[int], None] | None = None,
        on_unknown_fabric: Callable[[], None] | None = None,
    ) -> None:
        self.spool = spool
        self.client = client
        self.batch_size = batch_size
        self.base_backoff = base_backoff
        self.max_backoff = max_backoff
        self.idle_poll = idle_poll
        self.failures = 0  # consecutive
        self.last_success: float | None = None  # unix time of the last batch the server took
        self._on_sent = on_sent
        self._on_failure = on_failure
        self._on_refused = on_refused
        self._on_unknown_fabric = on_unknown_fabric
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="dynamiccl-sender", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def notify(self) -> None:
        """New batches are spooled: send without waiting for the idle poll."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                delay = self.drain_once()
            except Exception:  # the thread must outlive anything (a broken spool file, a bug)
                log.exception("sender loop failed; retrying")
                self.failures += 1
                delay = backoff_delay(self.failures, self.base_backoff, self.max_backoff)
            self._wake.wait(delay)
            self._wake.clear()

    def drain_once(self) -> float:
        """Send what is spooled until it is empty or a send fails; returns how long to wait next."""
        while not self._stop.is_set():
            batches = self.spool.peek_oldest(self.batch_size)
            if not batches:
                return self.idle_poll
            for batch in batches:
                if not self._send(batch):
                    self.failures += 1
                    if self._on_failure is not None:
                        self._on_failure()
                    return backoff_delay(self.failures, self.base_backoff, self.max_backoff)
        return 0.0

    def _send(self, batch: SpooledBatch) -> bool:
        """True when the batch is done with (stored, duplicate, or narrowed down to what is bad)."""
        if not self._deliver(batch.fabric_id, batch.batch_id, batch.measurements):
            return False
        self.spool.ack(batch.batch_id)
        self.failures = 0
        self.last_success = time.time()
        if self._on_sent is not None:
            self._on_sent(batch)
        return True

    def _deliver(self, fabric_id: str, batch_id: str, measurements: Sequence[Measurement]) -> bool:
        """Post a batch, narrowing it down if the server refuses it as bad; False: retry it later."""
        try:
            self.client.post_measurements(fabric_id, batch_id, measurements)
        except ApiError as error:
            if error.status_code == 404 and self._on_unknown_fabric is not None:
                self._on_unknown_fabric()
            if error.status_code >= 500 or error.status_code in RETRIED_4XX:
                log.warning("batch %s not sent, will retry: %s", batch_id, error)
                return False
            return self._narrow(fabric_id, batch_id, measurements, error)
        except (httpx.HTTPError, ValueError) as error:  # ValueError: an answer that is not BatchAccepted
            log.warning("batch %s not sent, will retry: %s", batch_id, error)
            return False
        return True

    def _narrow(self, fabric_id: str, batch_id: str, measurements: Sequence[Measurement], error: ApiError) -> bool:
        named = named_measurements(error.detail, len(measurements))
        if len(measurements) == 1 or len(named) == len(measurements):
            log.error("server refused %d measurement(s) of batch %s, dropping them: %s",
                      len(measurements), batch_id, error)
            if self._on_refused is not None:
                self._on_refused(len(measurements))
            return True
        if named:
            log.error("server refused %d of %d measurements of batch %s, dropping those: %s",
                      len(named), len(measurements), batch_id, error)
            if self._on_refused is not None:
                self._on_refused(len(named))
            rest = [m for i, m in enumerate(measurements) if i not in named]
            return self._deliver(fabric_id, part_id(batch_id, "rest"), rest)
        half = len(measurements) // 2
        return all([
            self._deliver(fabric_id, part_id(batch_id, "a"), measurements[:half]),
            self._deliver(fabric_id, part_id(batch_id, "b"), measurements[half:]),
        ])
