"""The learner: Tuner implementations behind one interface."""

from dynamiccl.server.learner.base import Pick, Tuner
from dynamiccl.server.learner.default import NcclDefaultTuner
from dynamiccl.server.storage.base import Store


def make_tuner(store: Store) -> Tuner:
    """The tuner a server runs with."""
    return NcclDefaultTuner()


__all__ = ["NcclDefaultTuner", "Pick", "Tuner", "make_tuner"]
