"""jobs table

Revision ID: 0001
Revises:
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import mysql

from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# name, columns, partial-index predicate (PostgreSQL and SQLite; MariaDB indexes whole).
_INDEXES: list[tuple[str, list[str], str | None]] = [
    (
        "ix_jobs_queue_status_priority_id",
        ["queue", "status", "priority", "id"],
        "status = 'queued'",
    ),
    ("ix_jobs_status_run_at", ["status", "run_at"], "status IN ('scheduled', 'retrying')"),
    ("ix_jobs_status_expires_at", ["status", "expires_at"], "expires_at IS NOT NULL"),
    ("ix_jobs_status_lease_expires_at", ["status", "lease_expires_at"], "status = 'running'"),
    ("ix_jobs_status_id", ["status", "id"], None),
    ("ix_jobs_task_id", ["task", "id"], None),
    ("ix_jobs_queue_id", ["queue", "id"], None),
]


def _timestamp() -> sa.types.TypeEngine[object]:
    # Naive UTC with microseconds everywhere (MariaDB's DATETIME defaults to whole seconds).
    return sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("task", sa.String(length=128), nullable=False),
        sa.Column("queue", sa.String(length=128), nullable=False),
        sa.Column("priority", sa.SmallInteger(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("args", sa.JSON(), nullable=False),
        sa.Column("kwargs", sa.JSON(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("max_retries", sa.Integer(), nullable=False),
        sa.Column("backoff_base", sa.Float(), nullable=False),
        sa.Column("backoff_max", sa.Float(), nullable=False),
        sa.Column("backoff_jitter", sa.Boolean(), nullable=False),
        sa.Column("timeout", sa.Float(), nullable=True),
        sa.Column("run_at", _timestamp(), nullable=False),
        sa.Column("expires_at", _timestamp(), nullable=True),
        sa.Column("lease_token", sa.String(length=64), nullable=True),
        sa.Column("lease_worker", sa.String(length=200), nullable=True),
        sa.Column("lease_expires_at", _timestamp(), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("error", sa.JSON(), nullable=True),
        sa.Column("progress", sa.JSON(), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("idempotency_key", sa.String(length=255), nullable=True),
        sa.Column("request_hash", sa.String(length=64), nullable=True),
        sa.Column("created_at", _timestamp(), nullable=False),
        sa.Column("started_at", _timestamp(), nullable=True),
        sa.Column("finished_at", _timestamp(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_jobs_idempotency_key")),
    )
    for name, columns, predicate in _INDEXES:
        where = {} if predicate is None else {"postgresql_where": sa.text(predicate),
                                              "sqlite_where": sa.text(predicate)}  # fmt: skip
        op.create_index(op.f(name), "jobs", columns, **where)


def downgrade() -> None:
    for name, _columns, _predicate in reversed(_INDEXES):
        op.drop_index(op.f(name), table_name="jobs")

    op.drop_table("jobs")
