"""Index pins by age: expired pins are pruned by created_at.

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_pins_created_at", "pins", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_pins_created_at", table_name="pins")
