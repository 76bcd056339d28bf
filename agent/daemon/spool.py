"""Durable on-disk queue of outgoing measurement batches (SQLite, WAL).

Every batch gets its id when it is spooled, `f"{agent_id}-{seq:012d}"`, and keeps
it through retries and agent restarts, so the server's idempotent batch ids make
a re-send count nothing twice. The agent id and the next sequence number live
in the spool itself: a restart continues the sequence, a fresh spool (new agent
id) can never collide with ids an old one used.

Durability: a batch is spooled when `put` returns: one transaction, in WAL mode with
synchronous=FULL, so it survives the agent's SIGKILL and a power cut, and a put interrupted
midway leaves nothing of its batch (tests/agent/daemon/test_spool.py kills a writer repeatedly).
Measurements still in the aggregator's window are not spooled yet: an unclean stop loses at
most one window (a clean stop spools it).

The spool is bounded (bytes and batches). Past a bound, or when the disk is
full, the OLDEST batches are dropped and counted: recent data is worth more to
the learner, and the agent must keep accepting data whatever the disk does.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dynamiccl.schemas import Measurement

log = logging.getLogger("dynamiccl.agent.daemon.spool")

DEFAULT_MAX_BYTES = 256 << 20
DEFAULT_MAX_BATCHES = 100_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY,
    batch_id TEXT NOT NULL UNIQUE,
    fabric_id TEXT NOT NULL,
    payload TEXT NOT NULL,
    nbytes INTEGER NOT NULL,
    created REAL NOT NULL
);
"""


@dataclass(frozen=True)
class SpooledBatch:
    batch_id: str
    fabric_id: str
    measurements: list[Measurement]


def _is_disk_full(error: sqlite3.OperationalError) -> bool:
    return "full" in str(error).lower()


class Spool:
    """Thread-safe FIFO of batches in one SQLite file; see the module docstring."""

    def __init__(
        self,
        path: Path,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_batches: int = DEFAULT_MAX_BATCHES,
        on_drop: Callable[[int], None] | None = None,
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_bytes = max_bytes
        self.max_batches = max_batches
        self.dropped = 0
        self._on_drop = on_drop
        self._lock = threading.Lock()
        # isolation_level=None: explicit BEGIN/COMMIT, so a put is one atomic transaction.
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")  # a 202 from the agent must survive a power cut
        self._conn.executescript(_SCHEMA)
        self.agent_id = self._agent_id()

    def _agent_id(self) -> str:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                row = self._conn.execute("SELECT value FROM meta WHERE key='agent_id'").fetchone()
                if row is None:
                    agent_id = f"agent-{uuid.uuid4().hex[:12]}"
                    self._conn.execute("INSERT INTO meta VALUES ('agent_id', ?)", (agent_id,))
                    self._conn.execute("INSERT INTO meta VALUES ('next_seq', '1')")
                else:
                    agent_id = row[0]
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
        return agent_id

    def put(self, fabric_id: str, measurements: Sequence[Measurement]) -> str | None:
        """Spool one batch; returns its id, or None if it could not be kept (counted as dropped).

        Never raises for a storage failure: the agent keeps accepting data whatever the disk does.
        """
        payload = json.dumps([m.model_dump(mode="json", exclude_none=True) for m in measurements])
        with self._lock:
            for attempt in range(2):
                try:
                    batch_id = self._insert(fabric_id, payload)
                    self._enforce_bounds()
                    return batch_id
                except sqlite3.OperationalError as error:
                    if not _is_disk_full(error):
                        log.error("spool %s unwritable, batch dropped: %s", self.path, error)
                        break
                    # Disk full: free room by dropping the oldest batch, then try once more.
                    if attempt == 0 and self._drop_oldest(1) == 0:
                        break
                except sqlite3.Error as error:
                    log.error("spool %s failed, batch dropped: %s", self.path, error)
                    break
            self._count_drop(1)
            return None

    def _insert(self, fabric_id: str, payload: str) -> str:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            seq = int(self._conn.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()[0])
            batch_id = f"{self.agent_id}-{seq:012d}"
            self._conn.execute(
                "INSERT INTO batches (seq, batch_id, fabric_id, payload, nbytes, created) VALUES (?,?,?,?,?,?)",
                (seq, batch_id, fabric_id, payload, len(payload), time.time()),
            )
            self._conn.execute("UPDATE meta SET value=? WHERE key='next_seq'", (str(seq + 1),))
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:  # SQLite already rolled back on some errors (disk full)
                self._conn.execute("ROLLBACK")
            raise
        return batch_id

    def _enforce_bounds(self) -> None:
        count, size = self._conn.execute("SELECT COUNT(*), COALESCE(SUM(nbytes), 0) FROM batches").fetchone()
        if count <= self.max_batches and size <= self.max_bytes:
            return
        excess = 0
        for (nbytes,) in self._conn.execute("SELECT nbytes FROM batches ORDER BY seq").fetchall():
            if count - excess <= self.max_batches and size <= self.max_bytes:
                break
            size -= nbytes
            excess += 1
        self._drop_oldest(excess)

    def _drop_oldest(self, n: int) -> int:
        cursor = self._conn.execute(
            "DELETE FROM batches WHERE seq IN (SELECT seq FROM batches ORDER BY seq LIMIT ?)", (n,)
        )
        self._count_drop(cursor.rowcount)
        return cursor.rowcount

    def _count_drop(self, n: int) -> None:
        if n > 0:
            self.dropped += n
            if self._on_drop is not None:
                self._on_drop(n)

    def peek_oldest(self, n: int = 1) -> list[SpooledBatch]:
        """The n oldest batches, oldest first, left in the spool until acked."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT batch_id, fabric_id, payload FROM batches ORDER BY seq LIMIT ?", (n,)
            ).fetchall()
        return [
            SpooledBatch(batch_id, fabric_id, [Measurement.model_validate(m) for m in json.loads(payload)])
            for batch_id, fabric_id, payload in rows
        ]

    def ack(self, batch_id: str) -> None:
        """Forget a batch (the server has it, or it was refused as bad)."""
        with self._lock:
            self._conn.execute("DELETE FROM batches WHERE batch_id=?", (batch_id,))

    def depth(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM batches").fetchone()[0])

    def size_bytes(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COALESCE(SUM(nbytes), 0) FROM batches").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._conn.close()
