"""DynamICCL's learner as a `Tuner`: NCCL's cost model as prior, a surrogate of the fabric's
departures from it, value-of-information exploration and a confidence-gated recommendation."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from dynamiccl.nccl.space import candidate_configs
from dynamiccl.nccl.tuner_rules import render_rules
from dynamiccl.schemas import (
    Context,
    Fabric,
    Measurement,
    Recommendation,
    RecommendResponse,
    SuggestionKind,
    WeightedContext,
)
from dynamiccl.server.learner.base import Pick, Tuner
from dynamiccl.server.learner.knowledge import KnowledgeBase
from dynamiccl.server.learner.policy import choose_recommendation, choose_suggestion
from dynamiccl.server.learner.workload import choose_env, tuner_rules
from dynamiccl.server.storage.base import Store


class DynamicclTuner(Tuner):
    def __init__(self, store: Store, on_refit: Callable[[float], None] | None = None) -> None:
        self.knowledge = KnowledgeBase(store, on_refit=on_refit)

    def close(self) -> None:
        self.knowledge.close()

    def observe(self, fabric_id: str, fabric: Fabric, measurements: Sequence[Measurement]) -> None:
        self.knowledge.get(fabric_id, fabric)
        self.knowledge.mark(fabric_id)

    def describe(self, fabric_id: str, fabric: Fabric) -> dict[str, int]:
        """How far this replica's learner has caught up with the store."""
        snapshot = self.knowledge.get(fabric_id, fabric).snapshot
        return {"measurements_learned": snapshot.measurements_seen, "sources_distrusted": len(snapshot.distrusted)}

    def suggest(
        self, fabric_id: str, fabric: Fabric, contexts: Sequence[Context], seed: int
    ) -> list[Pick]:
        knowledge = self.knowledge.get(fabric_id, fabric)
        candidates = [candidate_configs(fabric, c) for c in contexts]
        rng = np.random.default_rng(seed)
        picks = []
        for configs, estimates in zip(candidates, knowledge.estimates(list(zip(contexts, candidates)))):
            choice = choose_suggestion(estimates, rng)
            config = configs[choice.index]
            if config.is_default:
                kind = SuggestionKind.default
            else:
                kind = SuggestionKind.explore if choice.explore else SuggestionKind.exploit
            picks.append(Pick(config, kind))
        return picks

    def recommend(
        self, fabric_id: str, fabric: Fabric, contexts: Sequence[WeightedContext]
    ) -> RecommendResponse:
        knowledge = self.knowledge.get(fabric_id, fabric)
        snapshot = knowledge.snapshot
        plain = [c.context() for c in contexts]
        candidates = [candidate_configs(fabric, c) for c in plain]
        recommendations = []
        for context, configs, estimates in zip(
            plain, candidates, knowledge.estimates(list(zip(plain, candidates)))
        ):
            verdict = choose_recommendation(estimates)
            chosen, default = estimates[verdict.index], estimates[0]
            recommendations.append(
                Recommendation(
                    context=context,
                    config=configs[verdict.index],
                    predicted_latency_us=round(math.exp(chosen.mean), 3),
                    default_latency_us=round(math.exp(default.mean), 3),
                    speedup=round(math.exp(default.mean - chosen.mean), 4),
                    confidence=round(verdict.confidence, 4),
                    samples=chosen.samples,
                )
            )
        configs = [r.config for r in recommendations]
        weights = [c.weight for c in contexts]
        return RecommendResponse(
            recommendations=recommendations,
            env=choose_env(snapshot, plain, weights, configs),
            tuner_config=render_rules(tuner_rules(plain, configs, snapshot.prior.resolve)),
        )
