"""The simulated fabric: the embedded default that stands in for a GPU cluster."""

from dynamiccl.sim.clusters import random_cluster, random_clusters
from dynamiccl.sim.fabric import SimulatedFabric
from dynamiccl.sim.presets import PRESETS, Preset, get_preset

__all__ = ["PRESETS", "Preset", "SimulatedFabric", "get_preset", "random_cluster", "random_clusters"]
