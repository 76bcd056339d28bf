"""Initial schema: fabrics, batches, measurements, pins.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "fabrics",
        sa.Column("fabric_id", sa.String(128), primary_key=True),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_table(
        "batches",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("fabric_id", sa.String(128), sa.ForeignKey("fabrics.fabric_id", ondelete="CASCADE"), nullable=False),
        sa.Column("batch_id", sa.String(128), nullable=False),
        sa.Column("client", sa.String(128)),
        sa.Column("received_at", sa.Float, nullable=False),
        sa.Column("count", sa.Integer, nullable=False),
        sa.UniqueConstraint("fabric_id", "batch_id", name="uq_batches_fabric_batch"),
    )
    op.create_table(
        "measurements",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("fabric_id", sa.String(128), nullable=False),
        sa.Column("batch_pk", sa.Integer, sa.ForeignKey("batches.id", ondelete="CASCADE"), nullable=False),
        sa.Column("collective", sa.String(16), nullable=False),
        sa.Column("nbytes", sa.BigInteger, nullable=False),
        sa.Column("nranks", sa.Integer, nullable=False),
        sa.Column("nnodes", sa.Integer, nullable=False),
        sa.Column("algo", sa.String(16)),
        sa.Column("proto", sa.String(8)),
        sa.Column("nchannels", sa.Integer),
        sa.Column("latency_us", sa.Float, nullable=False),
        sa.Column("count", sa.BigInteger, nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("job_id", sa.String(128)),
        sa.Column("suggestion_id", sa.String(128)),
        sa.Column("client", sa.String(128)),
        sa.Column("ts", sa.Float),
    )
    op.create_index("ix_measurements_fabric_id", "measurements", ["fabric_id", "id"])
    op.create_index("ix_measurements_fabric_context", "measurements", ["fabric_id", "collective", "nranks", "nnodes"])
    op.create_table(
        "pins",
        sa.Column("key", sa.String(512), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    for table in ("pins", "measurements", "batches", "fabrics"):
        op.drop_table(table)
