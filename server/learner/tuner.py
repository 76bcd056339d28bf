"""DynamICCL's learner as a `Tuner`: NCCL's cost model as prior, a surrogate of the fabric's
departures from it, value-of-information exploration and a confidence-gated recommendation."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from dynamiccl.schemas import Context, Fabric, Measurement, SuggestionKind
from dynamiccl.server.learner.base import Decision, Pick, Tuner
from dynamiccl.server.learner.knowledge import KnowledgeBase
from dynamiccl.server.learner.policy import Choice, Plan
from dynamiccl.server.learner.stats import ContextKey
from dynamiccl.server.storage.base import Store


class DynamicclTuner(Tuner):
    def __init__(self, store: Store, on_refit: Callable[[float], None] | None = None,
                 retention_s: float | None = None, on_compact: Callable[[str, int], None] | None = None) -> None:
        self.knowledge = KnowledgeBase(store, on_refit=on_refit, retention_s=retention_s, on_compact=on_compact)

    def close(self) -> None:
        self.knowledge.close()

    def observe(self, fabric_id: str, fabric: Fabric, measurements: Sequence[Measurement]) -> None:
        self.knowledge.get(fabric_id, fabric)
        self.knowledge.mark(fabric_id)

    def caught_up(self, fabric_id: str, fabric: Fabric, target_id: int) -> bool:
        return self.knowledge.caught_up(fabric_id, fabric, target_id)

    def catch_up(self, fabric_id: str, fabric: Fabric, timeout_s: float, target_id: int | None = None,
                 with_model: bool = False) -> bool:
        return self.knowledge.catch_up(fabric_id, fabric, timeout_s, target_id, with_model)

    def describe(self, fabric_id: str, fabric: Fabric) -> dict[str, int]:
        """How far this replica's learner has caught up with the store."""
        snapshot = self.knowledge.get(fabric_id, fabric).snapshot
        return {"measurements_learned": snapshot.measurements_seen, "sources_distrusted": len(snapshot.distrusted),
                "configs_withdrawn": snapshot.withdrawn}

    def suggest(
        self, fabric_id: str, fabric: Fabric, contexts: Sequence[Context], seed: int
    ) -> list[Pick]:
        planned = self.knowledge.get(fabric_id, fabric).plans(contexts)
        rng = np.random.default_rng(seed)
        choices = [p.choose(rng) for _, p in planned]
        for index, trial in self._novel_trials(contexts, [p for _, p in planned]).items():
            choices[index] = Choice(trial, explore=True)
        picks = []
        for (decision, _), choice in zip(planned, choices):
            config = decision.candidates[choice.index]
            if config.is_default:
                kind = SuggestionKind.default
            else:
                kind = SuggestionKind.explore if choice.explore else SuggestionKind.exploit
            picks.append(Pick(config, kind))
        return picks

    @staticmethod
    def _novel_trials(contexts: Sequence[Context], plans: Sequence[Plan]) -> dict[int, int]:
        """Per context group (collective, ranks, nodes), the one most valuable trial of an
        (algorithm, protocol) NCCL's model alone rates there: {context index: candidate index}."""
        best: dict[tuple, tuple[float, int, int]] = {}
        for i, (context, plan) in enumerate(zip(contexts, plans)):
            if not plan.settled or (trial := plan.novel) is None:
                continue
            group = ContextKey.of(context).group
            if group not in best or trial[1] > best[group][0]:
                best[group] = (trial[1], i, trial[0])
        return {i: candidate for _, i, candidate in best.values()}

    def recommend(self, fabric_id: str, fabric: Fabric, contexts: Sequence[Context]) -> list[Decision]:
        return self.knowledge.get(fabric_id, fabric).decisions(contexts)
