"""DynamICCL's learner as a `Tuner`: NCCL's cost model as prior, a surrogate of the fabric's
departures from it, value-of-information exploration and a confidence-gated recommendation."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from dynamiccl.nccl.space import candidate_configs
from dynamiccl.schemas import Context, Fabric, Measurement, SuggestionKind
from dynamiccl.server.learner.base import Decision, Pick, Tuner
from dynamiccl.server.learner.guard import decide
from dynamiccl.server.learner.knowledge import KnowledgeBase
from dynamiccl.server.learner.policy import choose_suggestion
from dynamiccl.server.storage.base import Store


class DynamicclTuner(Tuner):
    def __init__(self, store: Store, on_refit: Callable[[float], None] | None = None) -> None:
        self.knowledge = KnowledgeBase(store, on_refit=on_refit)

    def close(self) -> None:
        self.knowledge.close()

    def observe(self, fabric_id: str, fabric: Fabric, measurements: Sequence[Measurement]) -> None:
        self.knowledge.get(fabric_id, fabric)
        self.knowledge.mark(fabric_id)

    def catch_up(self, fabric_id: str, fabric: Fabric, timeout_s: float) -> bool:
        return self.knowledge.catch_up(fabric_id, fabric, timeout_s)

    def describe(self, fabric_id: str, fabric: Fabric) -> dict[str, int]:
        """How far this replica's learner has caught up with the store."""
        snapshot = self.knowledge.get(fabric_id, fabric).snapshot
        return {"measurements_learned": snapshot.measurements_seen, "sources_distrusted": len(snapshot.distrusted),
                "configs_withdrawn": snapshot.withdrawn}

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

    def recommend(self, fabric_id: str, fabric: Fabric, contexts: Sequence[Context]) -> list[Decision]:
        knowledge = self.knowledge.get(fabric_id, fabric)
        candidates = [candidate_configs(fabric, c) for c in contexts]
        estimates = knowledge.estimates(list(zip(contexts, candidates)))
        return [decide(c, configs, e) for c, configs, e in zip(contexts, candidates, estimates)]
