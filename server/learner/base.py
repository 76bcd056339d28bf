"""The `Tuner` interface: the learner and its baselines are interchangeable behind it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from dynamiccl.schemas import (
    Context,
    Fabric,
    Measurement,
    NcclConfig,
    RecommendResponse,
    SuggestionKind,
    WeightedContext,
)


@dataclass(frozen=True)
class Pick:
    """One suggested configuration for one context."""

    config: NcclConfig
    kind: SuggestionKind


class Tuner(ABC):
    """Learns from measurements of a fabric; suggests what to try and recommends what to use.

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
    def recommend(
        self, fabric_id: str, fabric: Fabric, contexts: Sequence[WeightedContext]
    ) -> RecommendResponse:
        """Per-context recommendations (never exploring), one process-wide env and tuner rules."""

    def describe(self, fabric_id: str, fabric: Fabric) -> dict[str, int]:
        """What the tuner knows of a fabric, for its status page (nothing by default)."""
        return {}

    def close(self) -> None:
        """Stop background work."""
