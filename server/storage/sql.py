"""The one `Store` implementation: SQLAlchemy over SQLite (default) or PostgreSQL, by URL."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, delete, event, func, insert, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError

from dynamiccl.schemas import Context, Fabric, Measurement, NcclConfig
from dynamiccl.server.storage.base import Store, StoredMeasurement
from dynamiccl.server.storage.tables import batches, fabrics, measurements, pins

MIGRATIONS = Path(__file__).with_name("migrations")
#: A pin older than this is gone: the next request pins a fresh answer (a job's launches within
#: it share one answer; a job started again a week later gets what was learned since).
DEFAULT_PIN_TTL_S = 7 * 86400.0
#: At most this many pins are kept (the oldest go first), so the table cannot grow without bound.
DEFAULT_MAX_PINS = 100_000
#: Expired and surplus pins are deleted once every this many new pins.
PRUNE_EVERY = 64


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 10})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


#: Key of the PostgreSQL advisory lock that serialises migrations across replicas.
MIGRATION_LOCK = 0x64796E_6363_6C  # "dynccl"


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

    def close(self) -> None:
        self.engine.dispose()

    def put_fabric(self, fabric_id: str, fabric: Fabric) -> bool:
        body, now = fabric.model_dump_json(), time.time()
        with self.engine.begin() as conn:
            statement = self._insert(fabrics).values(fabric_id=fabric_id, body=body, created_at=now, updated_at=now)
            created = conn.execute(
                statement.on_conflict_do_update(
                    index_elements=["fabric_id"], set_={"body": body, "updated_at": now}
                ).returning(fabrics.c.created_at)
            ).scalar_one()
        return created == now

    def get_fabric(self, fabric_id: str) -> Fabric | None:
        with self.engine.connect() as conn:
            body = conn.execute(select(fabrics.c.body).where(fabrics.c.fabric_id == fabric_id)).scalar()
        return Fabric.model_validate_json(body) if body is not None else None

    def list_fabrics(self) -> dict[str, Fabric]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(fabrics.c.fabric_id, fabrics.c.body)).all()
        return {fabric_id: Fabric.model_validate_json(body) for fabric_id, body in rows}

    def fabric_counts(self, fabric_id: str) -> tuple[int, int]:
        where = measurements.c.fabric_id == fabric_id
        contexts = (
            select(measurements.c.collective, measurements.c.nbytes, measurements.c.nranks, measurements.c.nnodes)
            .where(where)
            .distinct()
            .subquery()
        )
        with self.engine.connect() as conn:
            total = conn.execute(select(func.count()).select_from(measurements).where(where)).scalar_one()
            distinct = conn.execute(select(func.count()).select_from(contexts)).scalar_one()
        return total, distinct

    def add_batch(
        self, fabric_id: str, batch_id: str, items: Sequence[Measurement], client: str | None = None
    ) -> bool:
        try:
            with self.engine.begin() as conn:
                batch_pk = conn.execute(
                    insert(batches)
                    .values(fabric_id=fabric_id, batch_id=batch_id, client=client,
                            received_at=time.time(), count=len(items))
                    .returning(batches.c.id)
                ).scalar_one()
                if items:  # one executemany: SQLite's and psycopg's bulk paths
                    conn.execute(insert(measurements), [_row(fabric_id, batch_pk, m, client) for m in items])
        except IntegrityError:
            if self._batch_exists(fabric_id, batch_id):
                return False
            raise
        return True

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

    def last_measurement_id(self, fabric_id: str) -> int:
        query = select(func.max(measurements.c.id)).where(measurements.c.fabric_id == fabric_id)
        with self.engine.connect() as conn:
            return conn.execute(query).scalar_one() or 0

    def pin(self, key: str, value: str, replace: bool = False) -> str:
        now = time.time()
        with self.engine.begin() as conn:
            statement = self._insert(pins).values(key=key, value=value, created_at=now)
            expired = pins.c.created_at < now - self.pin_ttl_s
            conn.execute(statement.on_conflict_do_update(
                index_elements=["key"], set_={"value": value, "created_at": now},
                where=None if replace else expired,
            ))
            stored = conn.execute(select(pins.c.value).where(pins.c.key == key)).scalar_one()
        self._pins_since_prune += 1
        if self._pins_since_prune >= PRUNE_EVERY:
            self.prune_pins()
        return stored

    def pinned(self, key: str) -> str | None:
        fresh = pins.c.created_at >= time.time() - self.pin_ttl_s
        with self.engine.connect() as conn:
            return conn.execute(select(pins.c.value).where(pins.c.key == key, fresh)).scalar()

    def prune_pins(self) -> int:
        """Delete expired pins and all but the newest `max_pins`; how many went."""
        self._pins_since_prune = 0
        with self.engine.begin() as conn:
            gone = conn.execute(delete(pins).where(pins.c.created_at < time.time() - self.pin_ttl_s)).rowcount
            surplus = select(pins.c.key).order_by(pins.c.created_at.desc(), pins.c.key).offset(self.max_pins)
            gone += conn.execute(delete(pins).where(pins.c.key.in_(surplus))).rowcount
        return gone

    def _insert(self, table):
        """The dialect's INSERT, which knows ON CONFLICT."""
        return (postgresql if self._dialect == "postgresql" else sqlite).insert(table)


def _row(fabric_id: str, batch_pk: int, m: Measurement, client: str | None) -> dict:
    c, k = m.context, m.config
    return {
        "fabric_id": fabric_id, "batch_pk": batch_pk,
        "collective": c.collective.value, "nbytes": c.nbytes, "nranks": c.nranks, "nnodes": c.nnodes,
        "algo": k.algo.value if k.algo else None, "proto": k.proto.value if k.proto else None,
        "nchannels": k.nchannels, "latency_us": m.latency_us, "count": m.count, "source": m.source,
        "job_id": m.job_id, "suggestion_id": m.suggestion_id, "client": client, "ts": m.ts,
    }


def _stored(row) -> StoredMeasurement:
    return StoredMeasurement(
        id=row["id"],
        context=Context(
            collective=row["collective"], nbytes=row["nbytes"], nranks=row["nranks"], nnodes=row["nnodes"]
        ),
        config=NcclConfig(algo=row["algo"], proto=row["proto"], nchannels=row["nchannels"]),
        latency_us=row["latency_us"],
        count=row["count"],
        source=row["source"],
        job_id=row["job_id"],
        suggestion_id=row["suggestion_id"],
        client=row["client"],
        ts=row["ts"],
    )

