"""Fine-tuning jobs: jobs (with their trainer's lease), events and checkpoints.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "fine_tuning_jobs",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("training_file", sa.String(64), nullable=False),
        sa.Column("validation_file", sa.String(64), nullable=True),
        sa.Column("suffix", sa.String(64), nullable=True),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("hyperparameters", sa.JSON(), nullable=False),
        sa.Column("options", sa.JSON(), nullable=False),
        sa.Column("fine_tuned_model", sa.String(200), nullable=True),
        sa.Column("error", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=True),
        sa.Column("finished_at", sa.Float(), nullable=True),
        sa.Column("trained_tokens", sa.BigInteger(), nullable=True),
        sa.Column("out_dir", sa.String(1024), nullable=True),
        sa.Column("trainer_id", sa.String(200), nullable=True),
        sa.Column("heartbeat_at", sa.Float(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_fine_tuning_jobs")),
    )
    with op.batch_alter_table("fine_tuning_jobs") as batch:
        batch.create_index("ix_fine_tuning_jobs_owner_created", ["owner", "created_at"])
        batch.create_index("ix_fine_tuning_jobs_status", ["status"])

    op.create_table(
        "fine_tuning_events",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                  autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("level", sa.String(8), nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=True),
        sa.Column("data", sa.JSON(none_as_null=True), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["fine_tuning_jobs.id"], ondelete="CASCADE",
                                name=op.f("fk_fine_tuning_events_job_id_fine_tuning_jobs")),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_fine_tuning_events")),
    )
    with op.batch_alter_table("fine_tuning_events") as batch:
        batch.create_index("ix_fine_tuning_events_job_seq", ["job_id", "seq"])

    op.create_table(
        "fine_tuning_checkpoints",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("job_id", sa.String(64), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("path", sa.String(1024), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["fine_tuning_jobs.id"], ondelete="CASCADE",
                                name=op.f("fk_fine_tuning_checkpoints_job_id_fine_tuning_jobs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_fine_tuning_checkpoints")),
        sa.UniqueConstraint("job_id", "step", name=op.f("uq_fine_tuning_checkpoints_job_id_step")),
    )
    with op.batch_alter_table("fine_tuning_checkpoints") as batch:
        batch.create_index(batch.f("ix_fine_tuning_checkpoints_job_id"), ["job_id"])


def downgrade() -> None:
    op.drop_table("fine_tuning_checkpoints")
    op.drop_table("fine_tuning_events")
    op.drop_table("fine_tuning_jobs")
