"""Model routing: the model registry (models) and what each worker loaded.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("checkpoint", sa.String(1024), nullable=True),
        sa.Column("base", sa.String(200), nullable=True),
        sa.Column("job_id", sa.String(64), nullable=True),
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_models")),
    )
    with op.batch_alter_table("workers") as batch:
        batch.add_column(sa.Column("checkpoint", sa.String(1024), nullable=True))
        batch.add_column(sa.Column("dtype", sa.String(16), nullable=True))
    # Batches already stored ran on whatever the fleet held: their names are known names.
    op.execute("INSERT INTO models (name, kind, owner, created_at) "
               "SELECT DISTINCT model, 'base', 'system', 0 FROM workers")


def downgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.drop_column("dtype")
        batch.drop_column("checkpoint")
    op.drop_table("models")
