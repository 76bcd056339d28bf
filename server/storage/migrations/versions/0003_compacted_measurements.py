"""Retention: counts of the measurements compacted away, per fabric, call and config.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "compacted_measurements",
        sa.Column("fabric_id", sa.String(128), primary_key=True),
        sa.Column("collective", sa.String(16), primary_key=True),
        sa.Column("nbytes", sa.BigInteger, primary_key=True),
        sa.Column("nranks", sa.Integer, primary_key=True),
        sa.Column("nnodes", sa.Integer, primary_key=True),
        sa.Column("algo", sa.String(16), primary_key=True),
        sa.Column("proto", sa.String(8), primary_key=True),
        sa.Column("nchannels", sa.Integer, primary_key=True),
        sa.Column("rows", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("compacted_measurements")
