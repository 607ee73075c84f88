"""flow control: named limits, queue settings, unique and debounced jobs

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import mysql

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _timestamp() -> sa.types.TypeEngine[object]:
    # Naive UTC with microseconds everywhere (MariaDB's DATETIME defaults to whole seconds).
    return sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    # A named limit, or a pattern (``customer-*``) whose values every matching name takes.
    op.create_table(
        "limits",
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("max_running", sa.Integer(), nullable=True),
        sa.Column("rate_limit", sa.Integer(), nullable=True),
        sa.Column("rate_period", sa.Float(), nullable=True),
        sa.Column("created_at", _timestamp(), nullable=False),
        sa.Column("updated_at", _timestamp(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_limits")),
    )
    op.create_table(
        "queue_settings",
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("paused", sa.Boolean(), nullable=False),
        sa.Column("max_running", sa.Integer(), nullable=True),
        sa.Column("rate_limit", sa.Integer(), nullable=True),
        sa.Column("rate_period", sa.Float(), nullable=True),
        sa.Column("updated_at", _timestamp(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_queue_settings")),
    )
    # One row per (limit key, job, lease): the slots held and the grants of the rate window.
    op.create_table(
        "limit_grants",
        sa.Column("limit_name", sa.String(length=200), nullable=False),
        sa.Column("lease_token", sa.String(length=64), nullable=False),
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("granted_at", _timestamp(), nullable=False),
        sa.PrimaryKeyConstraint(
            "limit_name", "job_id", "lease_token", name=op.f("pk_limit_grants")
        ),
    )
    op.create_index(
        op.f("ix_limit_grants_limit_name_granted_at"), "limit_grants", ["limit_name", "granted_at"]
    )
    # The claim on a unique or debounce key: its primary key serialises two replicas'
    # concurrent submits of one key.
    op.create_table(
        "job_keys",
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.PrimaryKeyConstraint("kind", "key", name=op.f("pk_job_keys")),
    )
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("limits", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("limit_key", sa.String(length=128), nullable=True))
        batch.add_column(sa.Column("unique_key", sa.String(length=255), nullable=True))
        batch.add_column(sa.Column("unique_until", _timestamp(), nullable=True))
        batch.add_column(sa.Column("debounce_key", sa.String(length=255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("debounce_key")
        batch.drop_column("unique_until")
        batch.drop_column("unique_key")
        batch.drop_column("limit_key")
        batch.drop_column("limits")
    op.drop_table("job_keys")
    op.drop_index(op.f("ix_limit_grants_limit_name_granted_at"), table_name="limit_grants")
    op.drop_table("limit_grants")
    op.drop_table("queue_settings")
    op.drop_table("limits")
