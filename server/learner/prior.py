"""NCCL's own cost model as the learner's prior.

The learner predicts how far a fabric departs from what NCCL's model says
(a log-latency residual), so an unmeasured config starts where NCCL would
put it. Configs are resolved first: fields left to NCCL are filled with what
NCCL would pick, so "NCCL decides" and the config NCCL picks share evidence
through the model.
"""

from __future__ import annotations

import math
from functools import lru_cache

from dynamiccl.nccl.cost_model import NcclCostModel
from dynamiccl.schemas import Context, Fabric, NcclConfig


class NcclPrior:
    """Cached resolution and predicted log latency under NCCL's cost model for one fabric."""

    def __init__(self, fabric: Fabric) -> None:
        self.fabric = fabric
        self._model = NcclCostModel(fabric)
        self.resolve = lru_cache(maxsize=65536)(self._model.resolve)
        self.log_time = lru_cache(maxsize=65536)(self._log_time)
        self._resolve_env = lru_cache(maxsize=65536)(self._resolve_env_uncached)

    def _log_time(self, context: Context, config: NcclConfig) -> float:
        resolved = self.resolve(context, config)
        time_us = self._model.time_us(context, resolved.algo, resolved.proto, resolved.nchannels)
        return math.log(max(time_us, 1e-3)) if math.isfinite(time_us) else math.log(1e12)

    def resolve_env(self, context: Context, env: dict[str, str]) -> NcclConfig:
        return self._resolve_env(context, tuple(sorted(env.items())))

    def _resolve_env_uncached(self, context: Context, env: tuple[tuple[str, str], ...]) -> NcclConfig:
        return self._model.resolve_env(context, dict(env))
