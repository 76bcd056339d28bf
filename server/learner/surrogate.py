"""The surrogate: how a fabric departs from NCCL's cost model, learned across contexts.

One model per fabric predicts the log-latency residual (measured minus NCCL's
prediction) from features of the call and of the config NCCL would run. A
tree ensemble shares what it learns across sizes, rank counts and
collectives; the spread of its trees plus a term that shrinks with nearby
evidence is its uncertainty, so a region nobody measured stays uncertain.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from dynamiccl.schemas import DEFAULT_CONFIG, Algo, Collective, Context, NcclConfig, Proto
from dynamiccl.server.learner.prior import NcclPrior

if TYPE_CHECKING:
    from sklearn.ensemble import ExtraTreesRegressor

#: Prior spread of NCCL's cost model error (log scale, ~15%) where nothing was measured nearby.
UNSEEN_RESIDUAL_STD = 0.15
#: The tree ensemble needs this many cells before it says more than the prior.
MIN_ROWS_TO_FIT = 24
#: Predictions a model remembers (a fabric's contexts times their candidates): a model never
#: changes, so a request that re-judges contexts after new measurements predicts nothing again.
PREDICTION_CACHE_LIMIT = 200_000

_COLLECTIVES = list(Collective)
_ALGOS = list(Algo)
_PROTOS = list(Proto)


@dataclass(frozen=True)
class Example:
    """One training row: a measured cell with its robust location."""

    context: Context
    config: NcclConfig
    log_latency: float
    weight: float


def _one_hot(value: object, options: list) -> list[float]:
    return [1.0 if value == option else 0.0 for option in options]


def pair_family(context: Context, resolved: NcclConfig) -> tuple:
    """What one measurement teaches about directly, on any channel count: the call's shape, the
    (algorithm, protocol) NCCL runs, and the size level (a factor of 4)."""
    return (context.collective, context.nnodes > 1, resolved.algo, resolved.proto,
            round(math.log2(context.nbytes + 1) / 2))


def _support_key(context: Context, resolved: NcclConfig) -> tuple:
    """Cells that inform each other directly: the same pair family and a similar channel count."""
    return (*pair_family(context, resolved), round(math.log2(resolved.nchannels or 1)))


class ResidualModel:
    """Predicts log latency as NCCL's prior plus a learned residual, with a standard deviation."""

    def __init__(self, prior: NcclPrior, examples: list[Example], seed: int = 0) -> None:
        self.prior = prior
        self._support: Counter[tuple] = Counter()
        self._forest: ExtraTreesRegressor | None = None
        self._predicted: dict[tuple, tuple[float, float]] = {}
        self._predicted_lock = threading.Lock()  # snapshots sharing this model may predict at once
        if not examples:
            return
        features, targets, weights = [], [], []
        for example in examples:
            resolved = prior.resolve(example.context, example.config)
            key = _support_key(example.context, resolved)
            self._support[key] += 1
            features.append(self.features(example.context, example.config))
            targets.append(example.log_latency - prior.log_time(example.context, example.config))
            weights.append(example.weight)
        if len(examples) >= MIN_ROWS_TO_FIT:
            # imported on the first fit (a background refit), not at start-up: a restarted server
            # answers seconds sooner
            from sklearn.ensemble import ExtraTreesRegressor

            self._forest = ExtraTreesRegressor(
                n_estimators=48, min_samples_leaf=2, max_features=0.7, random_state=seed, n_jobs=1
            )
            self._forest.fit(np.asarray(features), np.asarray(targets), sample_weight=np.asarray(weights))

    def features(self, context: Context, config: NcclConfig) -> list[float]:
        resolved = self.prior.resolve(context, config)
        default = self.prior.resolve(context, DEFAULT_CONFIG)
        relative_time = self.prior.log_time(context, config) - self.prior.log_time(context, DEFAULT_CONFIG)
        return self._features(context, resolved, default, relative_time)

    @staticmethod
    def _features(context: Context, resolved: NcclConfig, default: NcclConfig, relative_time: float) -> list[float]:
        channels = resolved.nchannels or 1
        return [
            *_one_hot(context.collective, _COLLECTIVES),
            *_one_hot(resolved.algo, _ALGOS),
            *_one_hot(resolved.proto, _PROTOS),
            math.log2(context.nbytes + 1),
            math.log2(context.nranks),
            math.log2(context.nnodes),
            math.log2(context.nranks / context.nnodes),
            math.log2(channels),
            math.log2(channels) - math.log2(default.nchannels or 1),
            relative_time,
        ]

    def _neighbour_support(self, key: tuple) -> int:
        *head, size, channels = key
        return sum(self._support[(*head, size + ds, channels)] for ds in (-1, 0, 1))

    def predict(self, pairs: list[tuple[Context, NcclConfig]]) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) of log latency for each (context, config). Pairs predicted before are
        looked up; the others are predicted in one batch."""
        keys = [(context.key(), config.key()) for context, config in pairs]
        with self._predicted_lock:
            missing = [i for i, key in enumerate(keys) if key not in self._predicted]
            if missing:
                if len(self._predicted) + len(missing) > PREDICTION_CACHE_LIMIT:
                    self._predicted.clear()
                means, stds = self._predict_batch([pairs[i] for i in missing])
                for i, mean, std in zip(missing, means.tolist(), stds.tolist()):
                    self._predicted[keys[i]] = (mean, std)
            predicted = [self._predicted[key] for key in keys]
        return np.array([p[0] for p in predicted], dtype=float), np.array([p[1] for p in predicted], dtype=float)

    def _predict_batch(self, pairs: list[tuple[Context, NcclConfig]]) -> tuple[np.ndarray, np.ndarray]:
        """`predict` for pairs not predicted yet: each pair and each context's default resolved
        under NCCL's model once, every tree asked once for all of them."""
        prior, support, features = [], [], []
        defaults: dict[tuple, tuple[NcclConfig, float]] = {}
        for context, config in pairs:
            if (default := defaults.get(context.key())) is None:
                default = defaults[context.key()] = (self.prior.resolve(context, DEFAULT_CONFIG),
                                                     self.prior.log_time(context, DEFAULT_CONFIG))
            resolved, log_time = self.prior.resolve(context, config), self.prior.log_time(context, config)
            key = _support_key(context, resolved)
            prior.append(log_time)
            support.append(self._neighbour_support(key))
            if self._forest is not None:
                features.append(self._features(context, resolved, default[0], log_time - default[1]))
        prior_mean = np.array(prior)
        unseen_var = UNSEEN_RESIDUAL_STD**2 / (1.0 + np.array(support))
        if self._forest is None or not pairs:
            return prior_mean, np.sqrt(unseen_var)
        per_tree = np.stack([tree.predict(np.asarray(features)) for tree in self._forest.estimators_])
        return prior_mean + per_tree.mean(axis=0), np.sqrt(per_tree.var(axis=0) + unseen_var)
