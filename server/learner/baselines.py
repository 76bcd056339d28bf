"""Baseline tuners behind the same interface, so benchmarks run them side by side.

* `NcclDefaultTuner`: never changes anything; what every other is judged by.
* `ExhaustiveSweepTuner`: tries every candidate of a context in turn, then the best.
* `CoordinateDescentTuner`: the AutoCCL approach: for each (algorithm, protocol)
  pair, descends over the channel count from NCCL's choice while it improves.

Both searching baselines keep their samples in memory per context, measure
the NCCL default `MIN_DEFAULT_SAMPLES` times first (the guard's baseline),
and propose the candidate with the lowest median, as their authors would; the guard
(`guard.decide`) judges their evidence as it judges the learner's.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from itertools import groupby

import numpy as np

from dynamiccl.nccl.space import CHANNEL_GRID, candidate_configs
from dynamiccl.schemas import DEFAULT_CONFIG, Context, Fabric, Measurement, NcclConfig, SuggestionKind
from dynamiccl.server.learner.base import Decision, Estimate, Pick, Tuner
from dynamiccl.server.learner.guard import MIN_DEFAULT_SAMPLES, decide
from dynamiccl.server.learner.stats import SINGLE_SAMPLE_STD, ContextKey

_Samples = dict[tuple[str, ContextKey], dict[NcclConfig, list[float]]]


def _estimate(samples: Sequence[float]) -> Estimate:
    """A baseline's evidence for one config: the median of its samples, with a standard error
    from their spread (a lone sample counts as uncertain as a straggler's slowdown)."""
    logs = np.log(np.asarray(samples, dtype=float))
    if len(logs) == 1:
        return Estimate(mean=float(logs[0]), std=SINGLE_SAMPLE_STD, samples=1)
    spread = 1.4826 * float(np.median(np.abs(logs - np.median(logs))))
    return Estimate(mean=float(np.median(logs)), std=1.25 * max(spread, 0.01) / math.sqrt(len(logs)),
                    samples=len(logs))


#: What a baseline knows of a config it never measured: nothing it would act on.
UNMEASURED = Estimate(mean=0.0, std=10.0, samples=0)


class NcclDefaultTuner(Tuner):
    def observe(self, fabric_id: str, fabric: Fabric, measurements: Sequence[Measurement]) -> None:
        return None

    def suggest(
        self, fabric_id: str, fabric: Fabric, contexts: Sequence[Context], seed: int
    ) -> list[Pick]:
        return [Pick(DEFAULT_CONFIG, SuggestionKind.default) for _ in contexts]

    def recommend(self, fabric_id: str, fabric: Fabric, contexts: Sequence[Context]) -> list[Decision]:
        return [Decision(c, (DEFAULT_CONFIG,), (UNMEASURED,), 0, confidence=0.0) for c in contexts]


class _SearchingTuner(Tuner):
    """Keeps samples per (fabric, context, config); proposes the lowest median."""

    def __init__(self) -> None:
        self._samples: _Samples = defaultdict(lambda: defaultdict(list))

    def observe(self, fabric_id: str, fabric: Fabric, measurements: Sequence[Measurement]) -> None:
        for m in measurements:
            self._samples[(fabric_id, ContextKey.of(m.context))][m.config].append(m.latency_us)

    def _medians(self, fabric_id: str, context: Context) -> dict[NcclConfig, float]:
        samples = self._samples[(fabric_id, ContextKey.of(context))]
        return {config: statistics.median(values) for config, values in samples.items()}

    def _best(self, fabric_id: str, context: Context) -> NcclConfig:
        medians = self._medians(fabric_id, context)
        return min(medians, key=medians.__getitem__) if medians else DEFAULT_CONFIG

    def _baseline_pending(self, fabric_id: str, context: Context) -> bool:
        """Whether the default still needs measuring before the search starts."""
        tried = self._samples[(fabric_id, ContextKey.of(context))]
        return len(tried.get(DEFAULT_CONFIG, ())) < MIN_DEFAULT_SAMPLES

    def recommend(self, fabric_id: str, fabric: Fabric, contexts: Sequence[Context]) -> list[Decision]:
        decisions = []
        for context in contexts:
            samples = self._samples[(fabric_id, ContextKey.of(context))]
            best = self._best(fabric_id, context)
            proposal = [DEFAULT_CONFIG] if best == DEFAULT_CONFIG else [DEFAULT_CONFIG, best]
            estimates = [_estimate(samples[c]) if samples.get(c) else UNMEASURED for c in proposal]
            decisions.append(decide(context, proposal, estimates))
        return decisions


class ExhaustiveSweepTuner(_SearchingTuner):
    def suggest(
        self, fabric_id: str, fabric: Fabric, contexts: Sequence[Context], seed: int
    ) -> list[Pick]:
        picks = []
        for context in contexts:
            if self._baseline_pending(fabric_id, context):
                picks.append(Pick(DEFAULT_CONFIG, SuggestionKind.default))
                continue
            tried = self._samples[(fabric_id, ContextKey.of(context))]
            untried = [c for c in candidate_configs(fabric, context) if c not in tried]
            if untried:
                picks.append(Pick(untried[0], SuggestionKind.explore))
            else:
                picks.append(Pick(self._best(fabric_id, context), SuggestionKind.exploit))
        return picks


class CoordinateDescentTuner(_SearchingTuner):
    """Per (algo, proto) pair, walk the channel grid from NCCL's default count downhill."""

    def suggest(
        self, fabric_id: str, fabric: Fabric, contexts: Sequence[Context], seed: int
    ) -> list[Pick]:
        return [self._next(fabric_id, fabric, context) for context in contexts]

    def _next(self, fabric_id: str, fabric: Fabric, context: Context) -> Pick:
        if self._baseline_pending(fabric_id, context):
            return Pick(DEFAULT_CONFIG, SuggestionKind.default)
        medians = self._medians(fabric_id, context)
        configs = [c for c in candidate_configs(fabric, context) if c.nchannels is not None]
        for _, group in groupby(configs, key=lambda c: (c.algo, c.proto)):
            ladder = sorted(group, key=lambda c: c.nchannels)
            step = self._descend(ladder, medians)
            if step is not None:
                return Pick(step, SuggestionKind.explore)
        return Pick(self._best(fabric_id, context), SuggestionKind.exploit)

    @staticmethod
    def _descend(ladder: list[NcclConfig], medians: dict[NcclConfig, float]) -> NcclConfig | None:
        """The next rung to measure on this pair's channel ladder, or None when at a minimum."""
        tried = [i for i, c in enumerate(ladder) if c in medians]
        if not tried:
            start = min(range(len(ladder)), key=lambda i: abs(ladder[i].nchannels - CHANNEL_GRID[3]))
            return ladder[start]
        best = min(tried, key=lambda i: medians[ladder[i]])
        for neighbour in (best - 1, best + 1):
            if 0 <= neighbour < len(ladder) and ladder[neighbour] not in medians:
                return ladder[neighbour]
        return None

