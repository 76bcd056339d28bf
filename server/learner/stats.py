"""Robust per-cell statistics of measured latencies, by source.

A cell is one (context bucket, config) pair of one fabric. Each stored
measurement is one sample: the mean latency of `count` calls, reported by a
source (the token name of the client that posted it; its job where the API is
open). Stragglers spoil whole samples and only ever make them slower, so a
source's location is the mean of its log latencies near their median (the
smaller of two when there are two). A source may also lie, so sources vote,
not samples: a cell's location is that of the samples of the sources that
agree with the median of the sources' own locations, so piling up samples
buys a source no say against the others. `corroborated`: enough sources agree
with its location and they outnumber two to one those that found it slower; a
claim that others measured and could not reproduce stays contested, however
many accomplices repeat it, and a source whose claims others keep refuting is
not listened to at all (`distrusted_sources`). How often stragglers strike,
and how hard, is learned from the fabric's repeated samples (`Stragglers`) and
weighs a cell's lone sample. What counts as evidence for a recommendation is
knowledge.py's trust model.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from scipy.special import expit, log_ndtr

from dynamiccl.schemas import Collective, Context, NcclConfig

#: Samples kept per source of a cell: older ones add little and the newest track drift.
MAX_SAMPLES_PER_SOURCE = 16
#: Sources kept per cell; the one heard from least recently makes room for a new one.
MAX_SOURCES_PER_CELL = 8
#: Noise assumed before a fabric has repeated samples to estimate it from (log scale).
DEFAULT_NOISE = 0.05
#: Least standard error of a cell with one sample: the size of a straggler's slowdown.
SINGLE_SAMPLE_STD = 0.15
#: Two samples further apart than this (log scale, ~15%) are taken as one straggler and one not;
#: two sources whose locations are closer than this agree.
STRAGGLER_GAP = 0.15
#: Standard error of a cell's location over that of a plain mean of as many clean samples
#: (samples a straggler spoiled are dropped, not counted).
LOCATION_INEFFICIENCY = 1.1
#: A source's claim is refuted in a cell when another source found the config this much slower
#: (log scale, 2x): beyond noise, beyond all but the worst stragglers.
REFUTE_GAP = math.log(2.0)
#: A source refuted this often (and at least MIN_REFUTED times) is not listened to at all.
MAX_REFUTED_SHARE = 0.2
MIN_REFUTED = 3
#: Stragglers assumed before a fabric has repeated samples to learn them from: the share of
#: samples a straggler slows beyond STRAGGLER_GAP, and its mean slowdown beyond that (log scale),
#: each weighing as much as this many samples (or stragglers) of the fabric's own.
DEFAULT_STRAGGLER_RATE = 0.05
DEFAULT_STRAGGLER_EXCESS = 0.3
STRAGGLER_PRIOR_SAMPLES = 100
STRAGGLER_PRIOR_STRAGGLERS = 10
#: A config a source ran this much slower than the default (log scale, 2%: "never slower") is
#: withdrawn from recommendation, whatever others measured.
WITHDRAW_GAP = math.log(1.02)


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


def _source_location(values: Iterable[float]) -> float:
    """The mean of the samples within STRAGGLER_GAP of their (lower) median: as efficient as a
    plain mean on clean samples, deaf to stragglers. Of two samples that disagree by more than
    noise can explain, the lower (the other is likely a straggler); likewise where no other
    sample is near the median (the samples scatter, several spoiled alike), those near the
    lowest: stragglers only ever slow a sample."""
    values = sorted(values)
    if len(values) == 2:
        low, high = values
        return low if high - low > STRAGGLER_GAP else (low + high) / 2
    median = statistics.median_low(values)  # a few values: pure Python beats numpy's per-call overhead
    near = [v for v in values if abs(v - median) <= STRAGGLER_GAP]
    if len(near) == 1:
        near = [v for v in values if v - values[0] <= STRAGGLER_GAP]
    return math.fsum(near) / len(near)


@dataclass
class Cell:
    """Samples of one (context bucket, config) on one fabric, per source. Its robust statistics
    are computed once per change: a fabric re-judges every cell on each refit, and most cells
    have nothing new."""

    by_source: dict[str, deque[float]] = field(default_factory=dict)
    log_nbytes_sum: float = 0.0
    samples_seen: int = 0
    #: The stored ids of the samples in `by_source`, alike per source: retention keeps these rows.
    ids: dict[str, deque[int]] = field(default_factory=dict, repr=False, compare=False)
    _located: dict[str, float] | None = field(default=None, repr=False, compare=False)
    _location: float | None = field(default=None, repr=False, compare=False)

    def add(self, nbytes: int, latency_us: float, source: str | None, row_id: int = 0) -> None:
        self._located = self._location = None
        key = source or ""
        samples = self.by_source.pop(key, None)  # re-inserted: the dict runs least recent first
        if samples is None:
            samples = deque(maxlen=MAX_SAMPLES_PER_SOURCE)
            self.ids[key] = deque(maxlen=MAX_SAMPLES_PER_SOURCE)
            if len(self.by_source) >= MAX_SOURCES_PER_CELL:
                evicted = next(iter(self.by_source))
                del self.by_source[evicted], self.ids[evicted]
        samples.append(math.log(latency_us))
        self.ids[key].append(row_id)
        self.by_source[key] = samples
        self.add_compacted(nbytes, 1)

    def add_compacted(self, nbytes: int, rows: int) -> None:
        """Count rows whose samples are gone (retention compacted them): they still weigh in the
        cell's mean message size."""
        self.log_nbytes_sum += rows * math.log2(nbytes + 1)
        self.samples_seen += rows

    @property
    def n(self) -> int:
        return sum(len(samples) for samples in self.by_source.values())

    @property
    def sources(self) -> int:
        return len(self.by_source)

    @property
    def mean_nbytes(self) -> int:
        return max(0, round(2 ** (self.log_nbytes_sum / self.samples_seen) - 1))

    def live_ids(self) -> Iterable[int]:
        """The stored ids of the samples the cell holds (every other row of it is spent)."""
        return (row_id for ids in self.ids.values() for row_id in ids)

    def without(self, distrusted: frozenset[str]) -> Cell | None:
        """This cell as if the `distrusted` sources had never reported (None if nothing is left)."""
        if not self.by_source:  # only compacted rows (retention): nothing to judge
            return None
        if distrusted.isdisjoint(self.by_source):
            return self
        kept = {source: samples for source, samples in self.by_source.items() if source not in distrusted}
        return Cell(kept, self.log_nbytes_sum, self.samples_seen) if kept else None

    def located(self) -> dict[str, float]:
        """Each source's own location."""
        if self._located is None:
            self._located = {source: _source_location(samples) for source, samples in self.by_source.items()}
        return self._located

    def source_locations(self) -> list[float]:
        return sorted(self.located().values())

    def location(self) -> float:
        if self._location is None:
            self._location = self._center_location()
        return self._location

    def _center_location(self) -> float:
        """Robust log-latency estimate. The sources vote for a center: the median of their
        locations (of an even count, the mean of the middle two where they agree, else the lower,
        as within a source: the other may be a straggler; `corroborated` says whether the center
        can be trusted). The estimate is the location of all samples of the sources that agree
        with the center: as efficient as pooling when sources agree, deaf to those that do not."""
        located = self.located()
        per_source = [(located[source], samples) for source, samples in self.by_source.items()]
        if len(per_source) == 1:
            return per_source[0][0]
        locations = sorted(location for location, _ in per_source)
        middle = len(locations) // 2
        center = locations[middle]
        if len(locations) % 2 == 0:
            low = locations[middle - 1]
            center = low if center - low > STRAGGLER_GAP else (low + center) / 2
        return _source_location(
            [v for location, samples in per_source if abs(location - center) <= STRAGGLER_GAP for v in samples]
        )

    def corroborated(self, quorum: int = 2, slower_contests: bool = True) -> bool:
        """At least `quorum` (and two) sources agree (within STRAGGLER_GAP) with the cell's
        location, and they outnumber two to one the sources that found it slower: a claim that
        others measured and could not reproduce is contested, however many accomplices repeat it
        (a dissenter's lone straggler keeps NCCL's default until its next sample). Without
        `slower_contests` (the baseline a claim is judged against), those that found it slower
        only need to be outnumbered: the location is the sources' median, which they cannot move."""
        center = self.location()
        locations = self.source_locations()
        agreeing = sum(abs(x - center) <= STRAGGLER_GAP for x in locations)
        slower = sum(x - center > STRAGGLER_GAP for x in locations)
        return agreeing >= max(quorum, 2) and agreeing > (2 if slower_contests else 1) * slower

    def std_error(self, noise: float) -> float:
        """Standard error of `location` for a fabric with per-sample noise `noise` (log scale).

        One sample may be a straggler (a whole sample slowed by tens of percent), so alone it
        counts for little: it cannot rule a config out, only call for a second look."""
        n = self.n
        if n == 1:
            return max(3.0 * noise, SINGLE_SAMPLE_STD)
        return LOCATION_INEFFICIENCY * noise / math.sqrt(n)


@dataclass(frozen=True)
class Stragglers:
    """How stragglers spoil a fabric's samples, learned from its repeated ones: `rate`, the share
    of samples more than STRAGGLER_GAP slower than their source's location; `excess`, their mean
    slowdown beyond that gap (log scale). Stragglers only ever slow a sample down."""

    rate: float = DEFAULT_STRAGGLER_RATE
    excess: float = DEFAULT_STRAGGLER_EXCESS

    @classmethod
    def learned(cls, cells: Iterable[Cell]) -> Stragglers:
        """From every source's samples of the cells it measured three times or more (where its
        location stands for the clean time), shrunk toward the defaults while they are few."""
        samples = slow = 0
        excess = 0.0
        for cell in cells:
            located = cell.located()
            for source, values in cell.by_source.items():
                if len(values) < 3:
                    continue
                samples += len(values)
                for v in values:
                    if (beyond := v - located[source] - STRAGGLER_GAP) > 0:
                        slow += 1
                        excess += beyond
        rate = (slow + STRAGGLER_PRIOR_SAMPLES * DEFAULT_STRAGGLER_RATE) / (samples + STRAGGLER_PRIOR_SAMPLES)
        mean_excess = (excess + STRAGGLER_PRIOR_STRAGGLERS * DEFAULT_STRAGGLER_EXCESS) / (
            slow + STRAGGLER_PRIOR_STRAGGLERS)
        return cls(min(rate, 0.5), max(mean_excess, 0.01))

    def lone_sample(self, prior_mean: float, prior_std: float, sample: float,
                    sample_std: float) -> tuple[float, float]:
        """(mean, std) of a config's log latency given the surrogate's prediction N(prior_mean,
        prior_std) and one sample, which is either clean (N(truth, sample_std)) or a straggler's
        (slower than the truth by STRAGGLER_GAP plus an exponential excess): the two explanations
        weighed by how well each predicts the sample, and the mixture matched by a normal. A lone
        sample far slower than predicted is then mostly taken for a straggler's, and the config
        gets a second look instead of being written off on one unlucky timing."""
        m, s = prior_mean, prior_std
        # clean: the normal posterior, weighed by the sample's normal marginal
        var = s**2 + sample_std**2
        clean_log_weight = (math.log1p(-self.rate) - 0.5 * (sample - m) ** 2 / var
                            - 0.5 * math.log(2 * math.pi * var))
        clean_mean = (m * sample_std**2 + sample * s**2) / var
        clean_square = s**2 * sample_std**2 / var + clean_mean**2
        # straggler: the prior times exp(truth / excess), truncated below the sample, is a
        # truncated normal; its weight is the exponentially modified normal's density
        lam, bound = self.excess, sample - STRAGGLER_GAP
        shifted = m + s**2 / lam
        beta = (bound - shifted) / s
        log_cdf = float(log_ndtr(beta))
        slow_log_weight = (math.log(self.rate) - math.log(lam) - (bound - m) / lam
                           + s**2 / (2 * lam**2) + log_cdf)
        hazard = math.exp(-0.5 * beta**2 - 0.5 * math.log(2 * math.pi) - log_cdf)  # pdf / cdf
        slow_mean = shifted - s * hazard
        slow_square = s**2 * max(1.0 - beta * hazard - hazard**2, 1e-9) + slow_mean**2
        clean = float(expit(clean_log_weight - slow_log_weight))
        mean = clean * clean_mean + (1.0 - clean) * slow_mean
        variance = clean * clean_square + (1.0 - clean) * slow_square - mean**2
        return mean, math.sqrt(max(variance, 1e-12))


def distrusted_sources(cells: Iterable[Cell]) -> frozenset[str]:
    """Sources whose claims others keep refuting: in at least MAX_REFUTED_SHARE of the cells they
    share with other sources (and MIN_REFUTED of them), another source measured the same config
    REFUTE_GAP slower, in at least two samples (a lone straggler refutes nobody). Honest sources are refuted only by the rare large straggler; a source
    that reports bad configs as fast is refuted wherever anyone checks. Decided from all
    sources at once, so framing honest sources with slow claims can only leave nobody
    trusted (and NCCL's defaults in force), never hand the liars the floor."""
    shared: dict[str, int] = defaultdict(int)
    refuted: dict[str, int] = defaultdict(int)
    for cell in cells:
        if len(cell.by_source) < 2:
            continue
        located = [(cell.located()[source], source, len(samples)) for source, samples in cell.by_source.items()]
        # a refutation needs a repeated measurement: one sample may be a straggler's
        slowest = max((location for location, _, n in located if n >= 2), default=-math.inf)
        for location, source, _ in located:
            shared[source] += 1
            refuted[source] += slowest - location > REFUTE_GAP
    return frozenset(
        source for source, count in refuted.items()
        if count >= MIN_REFUTED and count >= MAX_REFUTED_SHARE * shared[source]
    )


def slower_in_use(cell: Cell, default: Cell, noise: float) -> bool:
    """Whether a source that ran a config (twice or more) found it slower than NCCL's default by
    more than WITHDRAW_GAP and noise can explain: against its own measurements of the default
    where it has two or more (a paired comparison on the same nodes), else against the
    default's location."""
    overall = default.location()
    for source, samples in cell.by_source.items():
        if len(samples) < 2:
            continue
        own = default.by_source.get(source)
        own_default = default.located()[source] if own and len(own) >= 2 else None
        baseline, baseline_n = (own_default, len(own)) if own_default is not None else (overall, default.n)
        margin = WITHDRAW_GAP + 2.5 * noise * math.sqrt(1 / len(samples) + 1 / baseline_n)
        if cell.located()[source] - baseline > margin:
            return True
    return False


def pooled_noise(cells: list[Cell]) -> float:
    """Per-sample noise of a fabric (MAD of samples around their cell's location, over cells with
    repeated samples). Each source's own estimate is a vote, the upper median wins: a source that
    reports suspiciously steady numbers cannot make the fabric look quieter than it is."""
    by_source: dict[str, list[float]] = defaultdict(list)
    for cell in cells:
        if cell.n >= 3:
            center = cell.location()
            for source, values in cell.by_source.items():
                by_source[source].extend(abs(v - center) for v in values)
    votes = sorted(float(np.median(d)) for d in by_source.values() if len(d) >= 20)
    if not votes:
        pooled = [d for deviations in by_source.values() for d in deviations]
        if len(pooled) < 20:
            return DEFAULT_NOISE
        votes = [float(np.median(pooled))]
    return float(np.clip(1.4826 * votes[len(votes) // 2], 0.005, 0.3))


CellKey = tuple[ContextKey, tuple[str, str, int]]
DEFAULT_KEY = NcclConfig().key()


def cell_key(context: Context, config: NcclConfig) -> CellKey:
    return (ContextKey.of(context), config.key())
