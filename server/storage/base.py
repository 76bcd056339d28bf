"""The storage interface the server and the learner program against."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass

import anyio.to_thread

from dynamiccl.schemas import Context, Fabric, Measurement, NcclConfig


@dataclass(frozen=True)
class StoredMeasurement:
    """A measurement as stored: `id` grows with insertion order, so readers can page by it."""

    id: int
    context: Context
    config: NcclConfig
    latency_us: float
    count: int
    source: str
    job_id: str | None
    suggestion_id: str | None
    client: str | None
    ts: float | None


@dataclass(frozen=True)
class CompactedCount:
    """How many measurements of one call and config retention compacted away."""

    context: Context
    config: NcclConfig
    rows: int


class Store(ABC):
    """Fabrics, measurements and pins (answers that must be identical on every replica)."""

    @abstractmethod
    def put_fabric(self, fabric_id: str, fabric: Fabric) -> bool:
        """Create or replace a fabric; True when it was created."""

    @abstractmethod
    def get_fabric(self, fabric_id: str) -> Fabric | None: ...

    async def aget_fabric(self, fabric_id: str) -> Fabric | None:
        """`get_fabric` for a handler on the event loop, which it must not block: here on a worker
        thread."""
        return await anyio.to_thread.run_sync(self.get_fabric, fabric_id)

    @abstractmethod
    def list_fabrics(self) -> dict[str, Fabric]: ...

    @abstractmethod
    def fabric_counts(self, fabric_id: str) -> tuple[int, int]:
        """(measurements received, distinct contexts seen) for a fabric, compacted ones included."""

    @abstractmethod
    def add_batch(
        self,
        fabric_id: str,
        batch_id: str,
        measurements: Sequence[Measurement],
        client: str | None = None,
    ) -> bool:
        """Store a batch whole or not at all; False (and nothing stored) when the batch id was
        seen before for this fabric. Idempotency rests on a unique constraint, so it holds
        across server replicas sharing one database."""

    @abstractmethod
    def measurements(self, fabric_id: str, after_id: int = 0, limit: int | None = None) -> list[StoredMeasurement]:
        """Measurements of a fabric with id > after_id, in id order."""

    @abstractmethod
    def compact(self, fabric_id: str, through_id: int, received_before: float, keep: Set[int]) -> int:
        """Retention, in one transaction: delete the fabric's measurements with id <= `through_id`
        received before `received_before` (a Unix time), except the ids in `keep`, adding what was
        deleted to `compacted` per call and config, and the batches left empty; how many
        measurements were deleted. Safe to run on several replicas at once: a row deleted by one is
        counted by that one only."""

    @abstractmethod
    def compacted(self, fabric_id: str) -> list[CompactedCount]:
        """What `compact` took away from the fabric, per call and config."""

    @abstractmethod
    def last_measurement_id(self, fabric_id: str) -> int:
        """The highest id of the fabric's measurements (0: none); what a reader that has taken in
        everything stored so far has read up to."""

    async def alast_measurement_id(self, fabric_id: str) -> int:
        """`last_measurement_id` read after the call began, for a handler on the event loop (every
        suggest and recommend asks), which it must not block: here on a worker thread."""
        return await anyio.to_thread.run_sync(self.last_measurement_id, fabric_id)

    @abstractmethod
    def pin(self, key: str, value: str, replace: bool = False) -> str:
        """Store `value` under `key` unless an unexpired value is there already (or `replace`), and
        return the value now stored. The first writer wins across replicas."""

    @abstractmethod
    def pin_entries(self, key: str, entries: Mapping[str, str]) -> dict[str, str]:
        """Pin many entries under one key, in one transaction, each first writer winning on its
        own: entries another writer pinned there first keep their value, the others are added.
        {entry: the value now stored} for the entries asked. The pin expires (and counts toward
        the bound) as one."""

    async def apin_entries(self, key: str, entries: Mapping[str, str]) -> dict[str, str]:
        """`pin_entries` for a handler on the event loop, which it must not block: here on a
        worker thread."""
        return await anyio.to_thread.run_sync(self.pin_entries, key, entries)

    @abstractmethod
    def pinned(self, key: str) -> str | None:
        """The value pinned under `key`, if any and not expired."""

    @abstractmethod
    def prune_pins(self, slack: int = 0) -> int:
        """Delete expired pins and, once more than `slack` beyond the store's bound are kept, the
        oldest beyond the bound; how many went."""

    @abstractmethod
    def close(self) -> None: ...

    async def aclose(self) -> None:
        """`close`, from the event loop the server ran on (what it opened there is closed there)."""
        self.close()
