"""Robust per-cell statistics of measured latencies.

A cell is one (context bucket, config) pair of one fabric. Each stored
measurement is one sample: the mean latency of `count` calls. Stragglers spoil
whole samples and only ever make them slower, so a cell's location is the
median of its log latencies (the smaller of two when there are two): no
single sample decides.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from dynamiccl.schemas import Collective, Context, NcclConfig

#: Samples kept per cell: older ones add little and the newest track drift.
MAX_SAMPLES_PER_CELL = 64
#: Noise assumed before a fabric has repeated samples to estimate it from (log scale).
DEFAULT_NOISE = 0.05
#: Least standard error of a cell with one sample: the size of a straggler's slowdown.
SINGLE_SAMPLE_STD = 0.15
#: Two samples further apart than this (log scale, ~15%) are taken as one straggler and one not.
STRAGGLER_GAP = 0.15


def size_bucket(nbytes: int) -> int:
    """Half-octave bucket of a message size; the server's unit of "the same size"."""
    return round(2 * math.log2(nbytes + 1))


@dataclass(frozen=True, order=True)
class ContextKey:
    collective: Collective
    bucket: int
    nranks: int
    nnodes: int

    @classmethod
    def of(cls, context: Context) -> ContextKey:
        return cls(context.collective, size_bucket(context.nbytes), context.nranks, context.nnodes)

    @property
    def group(self) -> tuple[Collective, int, int]:
        """Contexts that differ only in size."""
        return (self.collective, self.nranks, self.nnodes)


@dataclass
class Cell:
    """Samples of one (context bucket, config) on one fabric."""

    log_latencies: deque[float] = field(default_factory=lambda: deque(maxlen=MAX_SAMPLES_PER_CELL))
    log_nbytes_sum: float = 0.0
    samples_seen: int = 0
    clients: set[str] = field(default_factory=set)

    def add(self, nbytes: int, latency_us: float, client: str | None) -> None:
        self.log_latencies.append(math.log(latency_us))
        self.log_nbytes_sum += math.log2(nbytes + 1)
        self.samples_seen += 1
        if client is not None and len(self.clients) < 16:
            self.clients.add(client)

    @property
    def n(self) -> int:
        return len(self.log_latencies)

    @property
    def mean_nbytes(self) -> int:
        return max(0, round(2 ** (self.log_nbytes_sum / self.samples_seen) - 1))

    def location(self) -> float:
        """Robust log-latency estimate of the cell: the median; of two samples that disagree by
        more than noise can explain, the lower (the other is likely a straggler)."""
        values = self.log_latencies
        if len(values) == 2:
            low, high = sorted(values)
            return low if high - low > STRAGGLER_GAP else (low + high) / 2
        return float(np.median(values))

    def std_error(self, noise: float) -> float:
        """Standard error of `location` for a fabric with per-sample noise `noise` (log scale).

        One sample may be a straggler (a whole sample slowed by tens of percent), so alone it
        counts for little: it cannot rule a config out, only call for a second look."""
        if self.n == 1:
            return max(3.0 * noise, SINGLE_SAMPLE_STD)
        return 1.25 * noise / math.sqrt(self.n)


def pooled_noise(cells: list[Cell]) -> float:
    """Per-sample noise of a fabric, from the spread of cells with repeated samples (MAD)."""
    deviations: list[float] = []
    for cell in cells:
        if cell.n >= 3:
            values = np.asarray(cell.log_latencies)
            deviations.extend(np.abs(values - np.median(values)))
    if len(deviations) < 20:
        return DEFAULT_NOISE
    return float(np.clip(1.4826 * np.median(deviations), 0.005, 0.3))


CellKey = tuple[ContextKey, tuple[str, str, int]]


def cell_key(context: Context, config: NcclConfig) -> CellKey:
    return (ContextKey.of(context), config.key())
