"""The learner: Tuner implementations behind one interface, one guard and one way to compose
what a job is given from their decisions."""

from collections.abc import Callable

from dynamiccl.server.learner.base import Decision, Estimate, Pick, Tuner
from dynamiccl.server.learner.baselines import (
    CoordinateDescentTuner,
    ExhaustiveSweepTuner,
    NcclDefaultTuner,
)
from dynamiccl.server.learner.compose import respond
from dynamiccl.server.storage.base import Store


def make_tuner(store: Store, on_refit: Callable[[float], None] | None = None, retention_s: float | None = None,
               on_compact: Callable[[str, int], None] | None = None) -> Tuner:
    """The tuner a server runs with: DynamICCL's learner over the shared store, compacting
    measurements older than `retention_s` (None: keep them all)."""
    from dynamiccl.server.learner.tuner import DynamicclTuner

    return DynamicclTuner(store, on_refit=on_refit, retention_s=retention_s, on_compact=on_compact)


__all__ = [
    "CoordinateDescentTuner",
    "Decision",
    "Estimate",
    "ExhaustiveSweepTuner",
    "NcclDefaultTuner",
    "Pick",
    "Tuner",
    "make_tuner",
    "respond",
]
