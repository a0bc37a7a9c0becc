"""Item claims: items.worker_id, and an index to find a batch's unclaimed items.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("items") as batch:
        batch.add_column(sa.Column("worker_id", sa.String(length=200), nullable=True))
    op.create_index("ix_items_batch_status_index", "items", ["batch_id", "status", "index"])


def downgrade() -> None:
    op.drop_index("ix_items_batch_status_index", table_name="items")
    with op.batch_alter_table("items") as batch:
        batch.drop_column("worker_id")
