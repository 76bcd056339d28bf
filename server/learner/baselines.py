"""Baseline tuners behind the same interface, so benchmarks run them side by side.

* `NcclDefaultTuner`: never changes anything; what every other is judged by.
* `ExhaustiveSweepTuner`: tries every candidate of a context in turn, then the best.
* `CoordinateDescentTuner`: the AutoCCL approach: for each (algorithm, protocol)
  pair, descends over the channel count from NCCL's choice while it improves.

Both searching baselines keep their samples in memory per context and
recommend the candidate with the lowest median, as their authors would.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from itertools import groupby

from dynamiccl.nccl.cost_model import NcclCostModel
from dynamiccl.nccl.space import CHANNEL_GRID, candidate_configs
from dynamiccl.nccl.tuner_rules import render_rules
from dynamiccl.schemas import (
    DEFAULT_CONFIG,
    Context,
    Fabric,
    Measurement,
    NcclConfig,
    Recommendation,
    RecommendResponse,
    SuggestionKind,
    WeightedContext,
)
from dynamiccl.server.learner.base import Pick, Tuner
from dynamiccl.server.learner.stats import ContextKey
from dynamiccl.server.learner.workload import tuner_rules

_Samples = dict[tuple[str, ContextKey], dict[NcclConfig, list[float]]]


class NcclDefaultTuner(Tuner):
    def observe(self, fabric_id: str, fabric: Fabric, measurements: Sequence[Measurement]) -> None:
        return None

    def suggest(
        self, fabric_id: str, fabric: Fabric, contexts: Sequence[Context], seed: int
    ) -> list[Pick]:
        return [Pick(DEFAULT_CONFIG, SuggestionKind.default) for _ in contexts]

    def recommend(
        self, fabric_id: str, fabric: Fabric, contexts: Sequence[WeightedContext]
    ) -> RecommendResponse:
        return _response(fabric, [c.context() for c in contexts], [DEFAULT_CONFIG] * len(contexts), {})


class _SearchingTuner(Tuner):
    """Keeps samples per (fabric, context, config); recommends the lowest median."""

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

    def recommend(
        self, fabric_id: str, fabric: Fabric, contexts: Sequence[WeightedContext]
    ) -> RecommendResponse:
        plain = [c.context() for c in contexts]
        medians = {i: self._medians(fabric_id, c) for i, c in enumerate(plain)}
        return _response(fabric, plain, [self._best(fabric_id, c) for c in plain], medians)


class ExhaustiveSweepTuner(_SearchingTuner):
    def suggest(
        self, fabric_id: str, fabric: Fabric, contexts: Sequence[Context], seed: int
    ) -> list[Pick]:
        picks = []
        for context in contexts:
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
        medians = self._medians(fabric_id, context)
        if DEFAULT_CONFIG not in medians:
            return Pick(DEFAULT_CONFIG, SuggestionKind.default)
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


def _response(
    fabric: Fabric,
    contexts: list[Context],
    configs: list[NcclConfig],
    medians: dict[int, dict[NcclConfig, float]],
) -> RecommendResponse:
    recommendations = []
    for i, (context, config) in enumerate(zip(contexts, configs)):
        seen = medians.get(i, {})
        default, chosen = seen.get(DEFAULT_CONFIG), seen.get(config)
        recommendations.append(
            Recommendation(
                context=context,
                config=config,
                predicted_latency_us=chosen,
                default_latency_us=default,
                speedup=default / chosen if default and chosen else 1.0,
                confidence=0.0,
                samples=len(seen),
            )
        )
    rules = tuner_rules(contexts, configs, NcclCostModel(fabric).resolve)
    return RecommendResponse(recommendations=recommendations, env={}, tuner_config=render_rules(rules))
