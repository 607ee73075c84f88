"""results lifecycle and webhook outbox

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import mysql

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _timestamp() -> sa.types.TypeEngine[object]:
    # Naive UTC with microseconds everywhere (MariaDB's DATETIME defaults to whole seconds).
    return sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    # Batch mode: SQLite cannot drop columns in place (downgrade), and it keeps the two
    # directions symmetric; elsewhere it is plain ALTER TABLE.
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("webhook", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("result_ttl", sa.Float(), nullable=True))
        batch.add_column(sa.Column("result_ref", sa.String(length=255), nullable=True))
        batch.add_column(sa.Column("result_expires_at", _timestamp(), nullable=True))
        batch.add_column(
            sa.Column("result_expired", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
    op.create_index(op.f("ix_jobs_result_expires_at"), "jobs", ["result_expires_at"])

    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("event", sa.String(length=32), nullable=False),
        sa.Column("url", sa.String(length=2000), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", _timestamp(), nullable=True),
        sa.Column("last_status_code", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", _timestamp(), nullable=False),
        sa.Column("updated_at", _timestamp(), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["jobs.id"],
            name=op.f("fk_webhook_deliveries_job_id_jobs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_deliveries")),
    )
    op.create_index(op.f("ix_webhook_deliveries_job_id"), "webhook_deliveries", ["job_id"])
    op.create_index(
        op.f("ix_webhook_deliveries_status_next_attempt_at"),
        "webhook_deliveries",
        ["status", "next_attempt_at"],
    )

    op.create_table(
        "webhook_attempts",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("delivery_id", sa.String(length=36), nullable=False),
        sa.Column("at", _timestamp(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("latency_ms", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["delivery_id"],
            ["webhook_deliveries.id"],
            name=op.f("fk_webhook_attempts_delivery_id_webhook_deliveries"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_attempts")),
    )
    op.create_index(op.f("ix_webhook_attempts_delivery_id"), "webhook_attempts", ["delivery_id"])


def downgrade() -> None:
    # Dropping a table drops its indexes; MariaDB refuses to drop an index alone while a
    # foreign key needs it.
    op.drop_table("webhook_attempts")
    op.drop_table("webhook_deliveries")

    op.drop_index(op.f("ix_jobs_result_expires_at"), table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("result_expired")
        batch.drop_column("result_expires_at")
        batch.drop_column("result_ref")
        batch.drop_column("result_ttl")
        batch.drop_column("webhook")
