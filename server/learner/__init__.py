"""The learner: Tuner implementations behind one interface."""

from collections.abc import Callable

from dynamiccl.server.learner.base import Pick, Tuner
from dynamiccl.server.learner.baselines import (
    CoordinateDescentTuner,
    ExhaustiveSweepTuner,
    NcclDefaultTuner,
)
from dynamiccl.server.storage.base import Store


def make_tuner(store: Store, on_refit: Callable[[float], None] | None = None) -> Tuner:
    """The tuner a server runs with: DynamICCL's learner over the shared store."""
    from dynamiccl.server.learner.tuner import DynamicclTuner

    return DynamicclTuner(store, on_refit=on_refit)


__all__ = [
    "CoordinateDescentTuner",
    "ExhaustiveSweepTuner",
    "NcclDefaultTuner",
    "Pick",
    "Tuner",
    "make_tuner",
]
