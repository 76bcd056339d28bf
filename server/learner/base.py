"""The `Tuner` interface: the learner and its baselines are interchangeable behind it.

A tuner suggests what to try and, for recommendations, returns `Decision`s:
the config it would run for each context with the evidence behind it, as
`guard.decide` judged it. What a job is given (the per-context
recommendations, one process-wide env and the tuner-plugin rules) is composed
from decisions once, the same way for every tuner (`compose.respond`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from dynamiccl.schemas import Context, Fabric, Measurement, NcclConfig, Recommendation, SuggestionKind


@dataclass(frozen=True)
class Pick:
    """One suggested configuration for one context."""

    config: NcclConfig
    kind: SuggestionKind


@dataclass(frozen=True)
class Estimate:
    """What a tuner knows of one config in one context: its log latency (mean and standard
    deviation, so a difference of 0.01 is about 1% of time) and what backs it."""

    mean: float
    std: float
    samples: int  # own samples in this context's size bucket
    transferred: bool = False  # evidence from neighbouring sizes or a similar fabric backs it
    trusted: bool = True  # the evidence may decide a recommendation (see knowledge.py's trust model)
    novel: bool = False  # nobody measured its (algorithm, protocol) at this size: a prior guess

    @property
    def latency_us(self) -> float:
        return math.exp(self.mean)


@dataclass(frozen=True)
class Decision:
    """A tuner's verdict for one context: `chosen` indexes `candidates` (index 0 is the NCCL
    default, and the verdict whenever the evidence does not confidently beat it)."""

    context: Context
    candidates: tuple[NcclConfig, ...]
    estimates: tuple[Estimate, ...]
    chosen: int
    confidence: float

    @property
    def config(self) -> NcclConfig:
        return self.candidates[self.chosen]

    @property
    def departs(self) -> bool:
        """Whether the decision changes what NCCL would run."""
        return not self.config.is_default

    @property
    def default(self) -> Estimate:
        return self.estimates[0]

    @property
    def estimate(self) -> Estimate:
        return self.estimates[self.chosen]

    def estimate_of(self, config: NcclConfig) -> Estimate | None:
        """The evidence for another candidate of this context (None: not a candidate)."""
        index = self._index_by_key.get(config.key())
        return None if index is None else self.estimates[index]

    @cached_property
    def recommendation(self) -> Recommendation:
        """The decision as `/v1/recommend` states it."""
        chosen, default = self.estimate, self.default
        return Recommendation(
            context=self.context,
            config=self.config,
            predicted_latency_us=round(chosen.latency_us, 3),
            default_latency_us=round(default.latency_us, 3),
            speedup=round(math.exp(default.mean - chosen.mean), 4),
            confidence=round(self.confidence, 4),
            samples=chosen.samples,
        )

    def forced_cost(self, key: tuple[str, str, int]) -> float:
        """`guard.forced_cost` of the candidate with this config key (inf: not a candidate): what a
        process-wide setting that makes NCCL run it would cost this call. Remembered: a decision
        is composed into many answers."""
        cost = self._forced.get(key)
        if cost is None:
            from dynamiccl.server.learner.guard import forced_cost  # the guard builds on this module

            index = self._index_by_key.get(key)
            cost = self._forced[key] = math.inf if index is None else forced_cost(self, self.candidates[index])
        return cost

    @cached_property
    def _forced(self) -> dict[tuple[str, str, int], float]:
        return {}

    @cached_property
    def _index_by_key(self) -> dict[tuple[str, str, int], int]:
        """Candidates by their plain key: a decision is looked up many times once made."""
        return {config.key(): index for index, config in enumerate(self.candidates)}


class Tuner(ABC):
    """Learns from measurements of a fabric; suggests what to try and decides what to use.

    `seed` makes `suggest` deterministic: the server derives it from the job, round and
    context when the caller pins the answer, so every replica gives the same one.
    """

    @abstractmethod
    def observe(self, fabric_id: str, fabric: Fabric, measurements: Sequence[Measurement]) -> None:
        """Take new measurements into account (may defer the work to a background refit)."""

    @abstractmethod
    def suggest(
        self, fabric_id: str, fabric: Fabric, contexts: Sequence[Context], seed: int
    ) -> list[Pick]:
        """One pick per context, in order."""

    @abstractmethod
    def recommend(self, fabric_id: str, fabric: Fabric, contexts: Sequence[Context]) -> list[Decision]:
        """One decision per context, in order, never exploring (`guard.decide` makes each)."""

    def caught_up(self, fabric_id: str, fabric: Fabric, target_id: int) -> bool:
        """Whether every measurement of the fabric up to id `target_id` is taken in already. Never
        blocks: a handler on the event loop asks. Tuners that learn as they observe always are."""
        return True

    def catch_up(self, fabric_id: str, fabric: Fabric, timeout_s: float, target_id: int | None = None,
                 with_model: bool = False) -> bool:
        """Wait (at most `timeout_s`) until every measurement of the fabric up to id `target_id`
        (None: every one stored before the call) is taken in; False when it could not.
        `with_model`: the caller will explore, so a tuner whose model of the fabric steers that
        may also wait (briefly) for the model to be refit on what was taken in."""
        return True

    def describe(self, fabric_id: str, fabric: Fabric) -> dict[str, int]:
        """What the tuner knows of a fabric, for its status page (nothing by default)."""
        return {}

    def close(self) -> None:
        """Stop background work."""
