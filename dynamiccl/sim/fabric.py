"""The simulated fabric: runs a collective call with a config and reports a noisy latency."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from dynamiccl.nccl.cost_model import NcclCostModel
from dynamiccl.nccl.space import candidate_configs, check_config
from dynamiccl.schemas import Context, Fabric, NcclConfig
from dynamiccl.sim.installed import InstalledNccl
from dynamiccl.sim.noise import noisy
from dynamiccl.sim.presets import Preset
from dynamiccl.sim.truth import TrueModel


class SimulatedFabric:
    """Stands in for a GPU cluster: `run` measures, the rest is ground truth for benchmarks."""

    def __init__(self, preset: Preset, seed: int | None = None) -> None:
        self.preset = preset
        #: what the cluster's NCCL picks where nothing forces a choice
        self.nccl = InstalledNccl(preset.fabric, {(a, p): f for a, p, f in preset.nccl_choice_bias})
        self._truth = TrueModel(NcclCostModel(preset.fabric), preset.seed, preset.effects)
        self._rng = np.random.default_rng(seed)
        self.true_latency_us = lru_cache(maxsize=None)(self._true_latency_us)

    @property
    def fabric(self) -> Fabric:
        return self.preset.fabric

    def run(self, context: Context, config: NcclConfig, count: int = 20) -> float:
        """Mean latency (us) of `count` calls run with `config`, as a timer would report it."""
        check_config(self.fabric, context, config)
        return noisy(self.true_latency_us(context, config), count, self._rng)

    def _true_latency_us(self, context: Context, config: NcclConfig) -> float:
        """Noiseless latency; fields left to NCCL are resolved as NCCL would."""
        return self._truth.latency_us(context, self.nccl.resolve(context, config))

    def default_config(self, context: Context) -> NcclConfig:
        return self.nccl.default(context)

    def oracle(self, context: Context) -> tuple[NcclConfig, float]:
        """The fastest candidate config and its noiseless latency."""
        times = {c: self.true_latency_us(context, c) for c in candidate_configs(self.fabric, context)}
        best = min(times, key=times.__getitem__)
        return best, times[best]

    def latency_under_env(self, context: Context, env: dict[str, str]) -> float:
        """Noiseless latency when the job runs with a process-wide NCCL environment."""
        return self._truth.latency_us(context, self.nccl.resolve_env(context, env))

    def latency_under_rules(self, context: Context, rules_text: str, example_plugin: bool = False) -> float:
        """Noiseless latency when DynamICCL's tuner plugin (or NCCL's example plugin) runs with
        these rules."""
        return self._truth.latency_us(context, self.nccl.resolve_rules(context, rules_text, example_plugin))
