"""NCCL's own cost model as the learner's prior.

The learner predicts how far a fabric departs from what NCCL's model says
(a log-latency residual), so an unmeasured config starts where NCCL would
put it. Configs are resolved first: fields left to NCCL are filled with what
NCCL would pick, so "NCCL decides" and the config NCCL picks share evidence
through the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache
from typing import TypeVar

from dynamiccl.nccl.cost_model import NcclCostModel
from dynamiccl.schemas import Context, Fabric, NcclConfig


#: Resolutions and predictions a prior remembers (a fabric's contexts times their candidates).
CACHE_LIMIT = 200_000
T = TypeVar("T")


def _remembered(cache: dict[tuple, T], key: tuple, compute: Callable[[], T]) -> T:
    """`cache[key]`, computed on a miss; a full cache starts over (its bound is the memory)."""
    value = cache.get(key)
    if value is None:
        if len(cache) >= CACHE_LIMIT:
            cache.clear()
        value = cache[key] = compute()
    return value


class NcclPrior:
    """Cached resolution and predicted log latency under NCCL's cost model for one fabric.

    The caches are keyed by the calls' and configs' plain keys: the surrogate asks for every
    candidate of every context it predicts, and hashing the wire models costs more than the
    lookup."""

    def __init__(self, fabric: Fabric) -> None:
        self.fabric = fabric
        self._model = NcclCostModel(fabric)
        self._resolved: dict[tuple, NcclConfig] = {}
        self._log_times: dict[tuple, float] = {}
        self._resolve_env = lru_cache(maxsize=65536)(self._resolve_env_uncached)

    def resolve(self, context: Context, config: NcclConfig) -> NcclConfig:
        """The config with what it leaves to NCCL filled in as NCCL would pick it."""
        return _remembered(self._resolved, (context.key(), config.key()), lambda: self._model.resolve(context, config))

    def log_time(self, context: Context, config: NcclConfig) -> float:
        return _remembered(self._log_times, (context.key(), config.key()), lambda: self._log_time(context, config))

    def _log_time(self, context: Context, config: NcclConfig) -> float:
        resolved = self.resolve(context, config)
        time_us = self._model.time_us(context, resolved.algo, resolved.proto, resolved.nchannels)
        return math.log(max(time_us, 1e-3)) if math.isfinite(time_us) else math.log(1e12)

    def resolve_env(self, context: Context, env: dict[str, str]) -> NcclConfig:
        return self._resolve_env(context, tuple(sorted(env.items())))

    def _resolve_env_uncached(self, context: Context, env: tuple[tuple[str, str], ...]) -> NcclConfig:
        return self._model.resolve_env(context, dict(env))
