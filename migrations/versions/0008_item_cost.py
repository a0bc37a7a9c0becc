"""Item cost: items.cost (estimated KV tokens: prompt + max_tokens x n), and an index to
find a batch's costliest unclaimed items.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Items of batches ingested before this revision cost 0: they are claimed as before
    # (in index order) and never hold back a claim.
    with op.batch_alter_table("items") as batch:
        batch.add_column(sa.Column("cost", sa.Integer(), nullable=False, server_default="0"))
    op.create_index("ix_items_batch_status_cost", "items", ["batch_id", "status", "cost"])


def downgrade() -> None:
    op.drop_index("ix_items_batch_status_cost", table_name="items")
    with op.batch_alter_table("items") as batch:
        batch.drop_column("cost")
