"""The one `Store` implementation: SQLAlchemy over SQLite (default) or PostgreSQL, by URL."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence, Set
from contextlib import contextmanager, nullcontext
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import anyio.to_thread
from alembic import command
from alembic.config import Config
from sqlalchemy import (
    Connection, Engine, Select, bindparam, create_engine, delete, event, func, insert, select, text, union,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import create_async_engine

from dynamiccl.schemas import Context, Fabric, Measurement, NcclConfig
from dynamiccl.server.storage.base import CompactedCount, Store, StoredMeasurement
from dynamiccl.server.storage.coalesce import BatchedCall, CoalescedRead
from dynamiccl.server.storage.tables import batches, compacted_measurements, fabrics, measurements, pins

MIGRATIONS = Path(__file__).with_name("migrations")
#: A pin older than this is gone: the next request pins a fresh answer (a job's launches within
#: it share one answer; a job started again a week later gets what was learned since).
DEFAULT_PIN_TTL_S = 7 * 86400.0
#: At most this many pins are kept (the oldest go first), so the table cannot grow without bound.
DEFAULT_MAX_PINS = 100_000
#: A fabric read from the database within this many seconds is not read again.
FABRIC_CACHE_S = 1.0
#: Expired and surplus pins are deleted once every this many new pins (or 1% of the bound, if
#: more: a prune reads the pins' index, so its cost is spread over as many pins as it may delete).
PRUNE_EVERY = 64
#: Those prunes delete the oldest pins beyond the bound once it is exceeded by this share of it.
PRUNE_SLACK = 0.1


#: Connections kept open: enough for a burst of concurrent requests to reuse them instead of
#: opening and closing one each (SQLAlchemy's defaults, 5 and 10, churn under 20 clients).
POOL_SIZE = 16
POOL_OVERFLOW = 16
#: Connections of the async pool (one read per fabric at a time runs on it).
ASYNC_POOL_SIZE = 4


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 10},
                               pool_size=POOL_SIZE, max_overflow=POOL_OVERFLOW)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=POOL_SIZE, max_overflow=POOL_OVERFLOW)


#: Read by every suggest and recommend: built once (built per call, the last id cost 3x as much).
_LAST_ID = select(func.max(measurements.c.id)).where(measurements.c.fabric_id == bindparam("fabric_id"))
_FABRIC = select(fabrics.c.body).where(fabrics.c.fabric_id == bindparam("fabric_id"))
#: Measurements deleted per statement when compacting (bounds the statement's parameter list).
COMPACT_CHUNK = 500
#: Key of the PostgreSQL advisory lock that serialises migrations across replicas.
MIGRATION_LOCK = 0x64796E_6363_6C  # "dynccl"
#: PostgreSQL hands out ids as rows are inserted, and transactions commit in any order: a batch
#: with lower ids committed after a later one would fall behind every reader that had paged past
#: the later one's ids (the learner reads by id). A transaction-scoped lock per fabric, taken
#: before the batch's first id, makes one fabric's batches commit in id order (on every replica);
#: SQLite lets one writer in at a time anyway.
_FABRIC_WRITE_LOCK = text("SELECT pg_advisory_xact_lock(:space, hashtext(:fabric_id))").bindparams(
    space=0x64636C)  # "dcl"


def upgrade(engine: Engine) -> None:
    """Bring the database to the newest schema (a newer server opens an older database).

    Replicas starting together on an empty PostgreSQL database would otherwise
    create the same tables at once and all but one fail; the transaction-scoped
    advisory lock makes the others wait and then find the schema current.
    (SQLite serialises writers by itself.)
    """
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


class SqlStore(Store):
    def __init__(self, url: str, pin_ttl_s: float = DEFAULT_PIN_TTL_S, max_pins: int = DEFAULT_MAX_PINS) -> None:
        self.url = url
        self.engine = make_engine(url)
        upgrade(self.engine)
        self._dialect = self.engine.dialect.name
        self.pin_ttl_s = pin_ttl_s
        self.max_pins = max_pins
        self._pins_since_prune = 0
        self._fabrics: dict[str, tuple[Fabric, float]] = {}  # fabric id -> (fabric, when read)
        self._write_lock = threading.Lock() if self._dialect == "sqlite" else nullcontext()
        # What handlers on the event loop read (`aget_fabric`, `alast_measurement_id`): on SQLite
        # in place, a local file that never waits on a network (yielding to the loop would put
        # the request behind every other one); on PostgreSQL through async connections, each
        # query shared by the concurrent requests that asked (a thread-pool hop per request cost
        # more than the answer under 20 concurrent clients: every hop contends for the GIL)
        self._async_engine = None if self._dialect == "sqlite" else create_async_engine(
            url, pool_pre_ping=True, pool_size=ASYNC_POOL_SIZE, max_overflow=0)
        self._fabric_bodies = CoalescedRead(partial(self._read_async, _FABRIC))
        self._last_ids = CoalescedRead(partial(self._read_async, _LAST_ID))
        self._pin_groups = BatchedCall(partial(anyio.to_thread.run_sync, self._pin_entries_together))

    def close(self) -> None:
        self.engine.dispose()

    async def aclose(self) -> None:
        if self._async_engine is not None:
            await self._async_engine.dispose()
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        """A write transaction. SQLite lets one writer in at a time and makes the others poll (its
        busy handler sleeps up to 100 ms a turn, so under a burst some writers wait seconds): this
        process's writers queue on a lock instead. PostgreSQL locks rows, not the database."""
        with self._write_lock, self.engine.begin() as conn:
            yield conn

    def put_fabric(self, fabric_id: str, fabric: Fabric) -> bool:
        body, now = fabric.model_dump_json(), time.time()
        with self._transaction() as conn:
            statement = self._insert(fabrics).values(fabric_id=fabric_id, body=body, created_at=now, updated_at=now)
            created = conn.execute(
                statement.on_conflict_do_update(
                    index_elements=["fabric_id"], set_={"body": body, "updated_at": now}
                ).returning(fabrics.c.created_at)
            ).scalar_one()
        self._fabrics[fabric_id] = (fabric, time.monotonic())
        return created == now

    def get_fabric(self, fabric_id: str) -> Fabric | None:
        """Every request reads its fabric: a copy read within FABRIC_CACHE_S is used (a change made
        through another replica shows within that time; through this one, at once)."""
        if (cached := self._cached_fabric(fabric_id)) is not None:
            return cached
        with self.engine.connect() as conn:
            return self._remember_fabric(fabric_id, conn.execute(_FABRIC, {"fabric_id": fabric_id}).scalar())

    async def aget_fabric(self, fabric_id: str) -> Fabric | None:
        if (cached := self._cached_fabric(fabric_id)) is not None:
            return cached
        if self._async_engine is None:
            return self.get_fabric(fabric_id)
        return self._remember_fabric(fabric_id, await self._fabric_bodies.read(fabric_id))

    def _cached_fabric(self, fabric_id: str) -> Fabric | None:
        cached = self._fabrics.get(fabric_id)
        if cached is not None and time.monotonic() - cached[1] < FABRIC_CACHE_S:
            return cached[0]
        return None

    def _remember_fabric(self, fabric_id: str, body: str | None) -> Fabric | None:
        if body is None:
            return None
        fabric = Fabric.model_validate_json(body)
        self._fabrics[fabric_id] = (fabric, time.monotonic())
        return fabric

    def list_fabrics(self) -> dict[str, Fabric]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(fabrics.c.fabric_id, fabrics.c.body)).all()
        return {fabric_id: Fabric.model_validate_json(body) for fabric_id, body in rows}

    def fabric_counts(self, fabric_id: str) -> tuple[int, int]:
        call = ("collective", "nbytes", "nranks", "nnodes")
        stored = measurements.c.fabric_id == fabric_id
        compacted = compacted_measurements.c.fabric_id == fabric_id
        contexts = union(
            select(*(measurements.c[name] for name in call)).where(stored),
            select(*(compacted_measurements.c[name] for name in call)).where(compacted),
        ).subquery()  # UNION: each call once, wherever its rows are
        with self.engine.connect() as conn:
            total = conn.execute(select(func.count()).select_from(measurements).where(stored)).scalar_one()
            total += conn.execute(select(func.coalesce(func.sum(compacted_measurements.c.rows), 0))
                                  .where(compacted)).scalar_one()
            distinct = conn.execute(select(func.count()).select_from(contexts)).scalar_one()
        return int(total), distinct

    def add_batch(
        self, fabric_id: str, batch_id: str, items: Sequence[Measurement], client: str | None = None
    ) -> bool:
        try:
            with self._transaction() as conn:
                if self._dialect == "postgresql":  # this fabric's batches commit in id order (see below)
                    conn.execute(_FABRIC_WRITE_LOCK, {"fabric_id": fabric_id})
                batch_pk = conn.execute(
                    insert(batches)
                    .values(fabric_id=fabric_id, batch_id=batch_id, client=client,
                            received_at=time.time(), count=len(items))
                    .returning(batches.c.id)
                ).scalar_one()
                if items:
                    self._insert_measurements(conn, [_row(fabric_id, batch_pk, m, client) for m in items])
        except IntegrityError:
            if self._batch_exists(fabric_id, batch_id):
                return False
            raise
        return True

    def _insert_measurements(self, conn: Connection, rows: list[tuple]) -> None:
        """Bulk insert in the batch's transaction, on each driver's fastest path: COPY on
        PostgreSQL; on SQLite, multi-row INSERTs of SQLITE_ROWS_PER_INSERT rows, so that the
        driver steps (and lets go of the GIL, which the learner's thread may then hold for a
        switch interval) once per statement rather than once per row. Neither compiles a
        statement per row, as SQLAlchemy's executemany of dictionaries does."""
        columns = ", ".join(ROW_COLUMNS)
        if self._dialect == "postgresql":
            statement = f"COPY measurements ({columns}) FROM STDIN"
            driver = conn.connection.driver_connection
            try:
                with driver.cursor() as cursor, cursor.copy(statement) as copy:
                    for row in rows:
                        copy.write_row(row)
            except driver.Error as error:  # as SQLAlchemy raises it (IntegrityError, OperationalError...)
                raise DBAPIError.instance(statement, None, error, type(driver).Error) from error
            return
        row_placeholders = f"({', '.join('?' * len(ROW_COLUMNS))})"
        for start in range(0, len(rows), SQLITE_ROWS_PER_INSERT):
            chunk = rows[start:start + SQLITE_ROWS_PER_INSERT]
            values = ", ".join([row_placeholders] * len(chunk))
            conn.exec_driver_sql(f"INSERT INTO measurements ({columns}) VALUES {values}",
                                 tuple(value for row in chunk for value in row))

    def _batch_exists(self, fabric_id: str, batch_id: str) -> bool:
        with self.engine.connect() as conn:
            found = conn.execute(
                select(batches.c.id).where(batches.c.fabric_id == fabric_id, batches.c.batch_id == batch_id)
            ).first()
        return found is not None

    def measurements(self, fabric_id: str, after_id: int = 0, limit: int | None = None) -> list[StoredMeasurement]:
        query = (
            select(measurements)
            .where(measurements.c.fabric_id == fabric_id, measurements.c.id > after_id)
            .order_by(measurements.c.id)
        )
        if limit is not None:
            query = query.limit(limit)
        with self.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [_stored(row) for row in rows]

    def compact(self, fabric_id: str, through_id: int, received_before: float, keep: Set[int]) -> int:
        call = (measurements.c.collective, measurements.c.nbytes, measurements.c.nranks, measurements.c.nnodes,
                measurements.c.algo, measurements.c.proto, measurements.c.nchannels)
        old = (
            select(measurements.c.id, *call)
            .join(batches, batches.c.id == measurements.c.batch_pk)
            .where(measurements.c.fabric_id == fabric_id, measurements.c.id <= through_id,
                   batches.c.received_at < received_before)
        )
        with self._transaction() as conn:
            groups: dict[tuple, list[int]] = {}
            for row_id, *key in conn.execute(old):
                if row_id not in keep:
                    groups.setdefault(tuple(key), []).append(row_id)
            counts: Counter[tuple] = Counter()
            for key, ids in groups.items():
                for start in range(0, len(ids), COMPACT_CHUNK):
                    # rowcount, not len(ids): a replica compacting at the same time deleted some
                    counts[key] += conn.execute(
                        delete(measurements).where(measurements.c.id.in_(ids[start:start + COMPACT_CHUNK]))
                    ).rowcount
            rows = [{"fabric_id": fabric_id, "collective": c, "nbytes": n, "nranks": r, "nnodes": nn,
                     "algo": a or "", "proto": p or "", "nchannels": ch or 0, "rows": k}
                    for (c, n, r, nn, a, p, ch), k in sorted(counts.items(), key=lambda item: str(item[0])) if k]
            if rows:
                statement = self._insert(compacted_measurements)
                conn.execute(statement.on_conflict_do_update(
                    index_elements=[c.name for c in compacted_measurements.primary_key],
                    set_={"rows": compacted_measurements.c.rows + statement.excluded.rows}), rows)
            deleted = sum(counts.values())
            # A batch with nothing left is forgotten too: its id then no longer marks a re-send
            # (an agent re-sends within minutes to days, retention is weeks).
            emptied = ~select(measurements.c.id).where(measurements.c.batch_pk == batches.c.id).exists()
            conn.execute(delete(batches).where(batches.c.fabric_id == fabric_id,
                                               batches.c.received_at < received_before, emptied))
        return deleted

    def compacted(self, fabric_id: str) -> list[CompactedCount]:
        table = compacted_measurements
        with self.engine.connect() as conn:
            rows = conn.execute(select(table).where(table.c.fabric_id == fabric_id)).mappings().all()
        return [CompactedCount(_context(r["collective"], r["nbytes"], r["nranks"], r["nnodes"]),
                               _config(r["algo"] or None, r["proto"] or None, r["nchannels"] or None), r["rows"])
                for r in rows]

    def last_measurement_id(self, fabric_id: str) -> int:
        with self.engine.connect() as conn:
            return conn.execute(_LAST_ID, {"fabric_id": fabric_id}).scalar_one() or 0

    async def alast_measurement_id(self, fabric_id: str) -> int:
        if self._async_engine is None:
            return self.last_measurement_id(fabric_id)
        return await self._last_ids.read(fabric_id) or 0

    async def _read_async(self, statement: Select, fabric_id: str) -> Any:
        async with self._async_engine.connect() as conn:
            return (await conn.execute(statement, {"fabric_id": fabric_id})).scalar()

    def pin(self, key: str, value: str, replace: bool = False) -> str:
        with self._transaction() as conn:
            stored = self._upsert_pin(conn, key, value, replace)
            if stored is None:  # an unexpired pin is there
                stored = conn.execute(select(pins.c.value).where(pins.c.key == key)).scalar_one()
        self._pinned(1)
        return stored

    def pin_entries(self, key: str, entries: Mapping[str, str]) -> dict[str, str]:
        return self._pin_entries_together([(key, entries)])[0]

    async def apin_entries(self, key: str, entries: Mapping[str, str]) -> dict[str, str]:
        """Written together with the calls made while the previous group was written, in one
        transaction on a worker thread (a hop and a transaction per request were more than half an
        online tuning round's suggest under 20 concurrent clients)."""
        return await self._pin_groups.call((key, entries))

    def _pin_entries_together(self, group: Sequence[tuple[str, Mapping[str, str]]]) -> list[dict[str, str]]:
        """`pin_entries` for each (key, entries) in one transaction, in key order (one lock order:
        concurrent groups cannot deadlock); a key asked twice is merged in the order asked."""
        answers: list[dict[str, str]] = [{} for _ in group]
        with self._transaction() as conn:
            for index in sorted(range(len(group)), key=lambda i: group[i][0]):
                answers[index] = self._pin_entries_in(conn, *group[index])
        self._pinned(len(group))
        return answers

    def _pin_entries_in(self, conn: Connection, key: str, entries: Mapping[str, str]) -> dict[str, str]:
        if not entries:
            return {}
        if self._upsert_pin(conn, key, json.dumps(entries), replace=False) is not None:
            return dict(entries)  # the first writer (the usual case): one row written, none read
        # add what is missing to the pin another writer made, its row locked until commit
        stored = json.loads(conn.execute(select(pins.c.value).where(pins.c.key == key).with_for_update()).scalar_one())
        if missing := {entry: value for entry, value in entries.items() if entry not in stored}:
            stored.update(missing)
            conn.execute(update(pins).where(pins.c.key == key).values(value=json.dumps(stored)))
        return {entry: stored[entry] for entry in entries}

    def _upsert_pin(self, conn: Connection, key: str, value: str, replace: bool) -> str | None:
        """Insert the pin, or overwrite one that expired (any, with `replace`): the value written,
        None when an unexpired pin was kept."""
        now = time.time()
        parameters = {"key": key, "value": value, "now": now}
        if not replace:
            parameters["expired_before"] = now - self.pin_ttl_s
        return conn.execute(_pin_upsert(self._dialect, replace), parameters).scalar()

    def _pinned(self, count: int) -> None:
        self._pins_since_prune += count
        if self._pins_since_prune >= max(PRUNE_EVERY, self.max_pins // 100):
            self.prune_pins(slack=int(self.max_pins * PRUNE_SLACK))

    def pinned(self, key: str) -> str | None:
        fresh = pins.c.created_at >= time.time() - self.pin_ttl_s
        with self.engine.connect() as conn:
            return conn.execute(select(pins.c.value).where(pins.c.key == key, fresh)).scalar()

    def prune_pins(self, slack: int = 0) -> int:
        """Delete expired pins and, once more than `max_pins` + `slack` are kept, all but the newest
        `max_pins`; how many went. (Finding the newest sorts every pin: tens of milliseconds under
        the write lock at 50,000, so the prunes that follow pinning leave PRUNE_SLACK of room.)"""
        self._pins_since_prune = 0
        with self._transaction() as conn:
            gone = conn.execute(delete(pins).where(pins.c.created_at < time.time() - self.pin_ttl_s)).rowcount
            if conn.execute(select(func.count()).select_from(pins)).scalar_one() > self.max_pins + slack:
                surplus = select(pins.c.key).order_by(pins.c.created_at.desc(), pins.c.key).offset(self.max_pins)
                gone += conn.execute(delete(pins).where(pins.c.key.in_(surplus))).rowcount
        return gone

    def _insert(self, table):
        return _dialect_insert(self._dialect, table)


def _dialect_insert(dialect: str, table):
    """The dialect's INSERT, which knows ON CONFLICT."""
    return (postgresql if dialect == "postgresql" else sqlite).insert(table)


@lru_cache(maxsize=None)
def _pin_upsert(dialect: str, replace: bool):
    """INSERT a pin (key, value, now) or overwrite one created before `expired_before` (any, with
    `replace`), RETURNING the value written. Built once: a statement built per call cost as much
    as running it."""
    statement = _dialect_insert(dialect, pins).values(
        key=bindparam("key"), value=bindparam("value"), created_at=bindparam("now"))
    return statement.on_conflict_do_update(
        index_elements=["key"], set_={"value": statement.excluded.value, "created_at": statement.excluded.created_at},
        where=None if replace else pins.c.created_at < bindparam("expired_before"),
    ).returning(pins.c.value)


#: Rows per INSERT statement on SQLite (16 columns: well within its 32,766 bound variables).
SQLITE_ROWS_PER_INSERT = 1000
#: The measurement columns a batch writes, in `_row`'s order.
ROW_COLUMNS = ("fabric_id", "batch_pk", "collective", "nbytes", "nranks", "nnodes", "algo", "proto", "nchannels",
               "latency_us", "count", "source", "job_id", "suggestion_id", "client", "ts")


def _row(fabric_id: str, batch_pk: int, m: Measurement, client: str | None) -> tuple:
    c, k = m.context, m.config
    return (fabric_id, batch_pk, c.collective.value, c.nbytes, c.nranks, c.nnodes,
            k.algo.value if k.algo else None, k.proto.value if k.proto else None, k.nchannels,
            m.latency_us, m.count, m.source, m.job_id, m.suggestion_id, client, m.ts)


@lru_cache(maxsize=65536)
def _context(collective: str, nbytes: int, nranks: int, nnodes: int) -> Context:
    """One shared instance per kind of call: a fabric's history repeats a few thousand of them."""
    return Context(collective=collective, nbytes=nbytes, nranks=nranks, nnodes=nnodes)


@lru_cache(maxsize=4096)
def _config(algo: str | None, proto: str | None, nchannels: int | None) -> NcclConfig:
    return NcclConfig(algo=algo, proto=proto, nchannels=nchannels)


def _stored(row) -> StoredMeasurement:
    return StoredMeasurement(
        id=row["id"],
        context=_context(row["collective"], row["nbytes"], row["nranks"], row["nnodes"]),
        config=_config(row["algo"], row["proto"], row["nchannels"]),
        latency_us=row["latency_us"],
        count=row["count"],
        source=row["source"],
        job_id=row["job_id"],
        suggestion_id=row["suggestion_id"],
        client=row["client"],
        ts=row["ts"],
    )

