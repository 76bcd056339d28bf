"""The SQL schema (SQLAlchemy Core). Migrations in `migrations/` create and evolve it."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

fabrics = Table(
    "fabrics",
    metadata,
    Column("fabric_id", String(128), primary_key=True),
    Column("body", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)

batches = Table(
    "batches",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("fabric_id", String(128), ForeignKey("fabrics.fabric_id", ondelete="CASCADE"), nullable=False),
    Column("batch_id", String(128), nullable=False),
    Column("client", String(128)),
    Column("received_at", Float, nullable=False),
    Column("count", Integer, nullable=False),
    # Idempotency rests on this constraint, so it holds across replicas sharing the database.
    UniqueConstraint("fabric_id", "batch_id", name="uq_batches_fabric_batch"),
)

measurements = Table(
    "measurements",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("fabric_id", String(128), nullable=False),
    Column("batch_pk", Integer, ForeignKey("batches.id", ondelete="CASCADE"), nullable=False),
    Column("collective", String(16), nullable=False),
    Column("nbytes", BigInteger, nullable=False),
    Column("nranks", Integer, nullable=False),
    Column("nnodes", Integer, nullable=False),
    Column("algo", String(16)),
    Column("proto", String(8)),
    Column("nchannels", Integer),
    Column("latency_us", Float, nullable=False),
    Column("count", BigInteger, nullable=False),
    Column("source", String(16), nullable=False),
    Column("job_id", String(128)),
    Column("suggestion_id", String(128)),
    Column("client", String(128)),
    Column("ts", Float),
    Index("ix_measurements_fabric_id", "fabric_id", "id"),
    Index("ix_measurements_fabric_context", "fabric_id", "collective", "nranks", "nnodes"),
)

#: What retention compacted away: per fabric, call and config, how many measurements there were,
#: so that counts and each cell's mean message size survive them. Their latencies are not kept:
#: the learner keeps only each source's newest samples of a cell, and those rows stay.
compacted_measurements = Table(
    "compacted_measurements",
    metadata,
    Column("fabric_id", String(128), primary_key=True),
    Column("collective", String(16), primary_key=True),
    Column("nbytes", BigInteger, primary_key=True),
    Column("nranks", Integer, primary_key=True),
    Column("nnodes", Integer, primary_key=True),
    Column("algo", String(16), primary_key=True),  # "" where NCCL decides
    Column("proto", String(8), primary_key=True),
    Column("nchannels", Integer, primary_key=True),  # 0 where NCCL decides
    Column("rows", BigInteger, nullable=False),
)

pins = Table(
    "pins",
    metadata,
    Column("key", String(512), primary_key=True),
    Column("value", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Index("ix_pins_created_at", "created_at"),
)
