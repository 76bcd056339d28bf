"""Windowed aggregation of measurements before they are spooled.

A training job issues thousands of identical calls a second; the server needs
one row per (job, context, config) and window, carrying the count-weighted mean
latency and the total count. Source and suggestion id are part of the key too,
so a suggestion's measurement stays attributable and sources are never mixed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from dynamiccl.agent.daemon.spool import Spool
from dynamiccl.schemas import MAX_BATCH_MEASUREMENTS, MAX_COUNT, Measurement

DEFAULT_WINDOW_S = 10.0
DEFAULT_MAX_KEYS = MAX_BATCH_MEASUREMENTS

_Key = tuple[object, ...]


@dataclass
class _Cell:
    first: Measurement
    weighted_latency: float  # sum of latency_us * count
    count: int
    ts: float | None


def _key(m: Measurement) -> _Key:
    return (m.job_id, m.source, m.suggestion_id, m.context.key(), m.config.key())


class Aggregator:
    """Accumulates measurements; `tick()` spools a window once it is `window_s` old.

    At most `max_keys` distinct keys are held: one more flushes the window early,
    so memory stays bounded whatever the callers send.
    """

    def __init__(
        self,
        spool: Spool,
        fabric_id: str,
        window_s: float = DEFAULT_WINDOW_S,
        max_keys: int = DEFAULT_MAX_KEYS,
        on_flush: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.spool = spool
        self.fabric_id = fabric_id
        self.window_s = window_s
        self.max_keys = min(max_keys, MAX_BATCH_MEASUREMENTS)
        self._on_flush = on_flush
        self._clock = clock
        self._cells: dict[_Key, _Cell] = {}
        self._window_start = clock()
        self._lock = threading.Lock()

    def add(self, measurements: Iterable[Measurement]) -> None:
        for m in measurements:
            with self._lock:
                key = _key(m)
                cell = self._cells.get(key)
                if cell is None and len(self._cells) >= self.max_keys:
                    self._flush_locked()
                if cell is None or cell.count + m.count > MAX_COUNT:
                    if cell is not None:
                        self._flush_locked()
                    self._cells[key] = _Cell(m, m.latency_us * m.count, m.count, m.ts)
                    continue
                cell.weighted_latency += m.latency_us * m.count
                cell.count += m.count
                if m.ts is not None:
                    cell.ts = m.ts if cell.ts is None else max(cell.ts, m.ts)

    def pending(self) -> int:
        """Distinct keys waiting for the window to close."""
        with self._lock:
            return len(self._cells)

    def tick(self) -> str | None:
        """Flush if the current window is over; returns the spooled batch id, if any."""
        with self._lock:
            if self._clock() - self._window_start < self.window_s:
                return None
            return self._flush_locked()

    def flush(self) -> str | None:
        """Spool whatever is pending now (shutdown)."""
        with self._lock:
            return self._flush_locked()

    def _flush_locked(self) -> str | None:
        cells, self._cells = self._cells, {}
        self._window_start = self._clock()
        if not cells:
            return None
        now = time.time()
        rows = [
            c.first.model_copy(
                update={"latency_us": c.weighted_latency / c.count, "count": c.count, "ts": c.ts or now}
            )
            for c in cells.values()
        ]
        batch_id = self.spool.put(self.fabric_id, rows)
        if self._on_flush is not None:
            self._on_flush(len(rows))
        return batch_id
