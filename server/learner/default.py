"""The NCCL default as a Tuner: never changes anything. The baseline every other is judged by."""

from __future__ import annotations

from collections.abc import Sequence

from dynamiccl.nccl.tuner_rules import render_rules
from dynamiccl.schemas import (
    DEFAULT_CONFIG,
    Context,
    Fabric,
    Measurement,
    Recommendation,
    RecommendResponse,
    SuggestionKind,
    WeightedContext,
)
from dynamiccl.server.learner.base import Pick, Tuner


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
        recommendations = [
            Recommendation(
                context=c.context(),
                config=DEFAULT_CONFIG,
                predicted_latency_us=None,
                default_latency_us=None,
                speedup=1.0,
                confidence=0.0,
                samples=0,
            )
            for c in contexts
        ]
        return RecommendResponse(recommendations=recommendations, env={}, tuner_config=render_rules([]))
