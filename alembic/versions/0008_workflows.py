"""workflows: jobs with dependencies (issue 18)

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import mysql

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _datetime() -> sa.types.TypeEngine[object]:
    # As UTCDateTime (service/models.py): microseconds on MariaDB too.
    return sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    op.create_table(
        "workflows",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("on_failure", sa.String(length=24), nullable=False),
        sa.Column("jobs_total", sa.Integer(), nullable=False),
        sa.Column("unfinished", sa.Integer(), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("webhook", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("created_at", _datetime(), nullable=False),
        sa.Column("finished_at", _datetime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workflows")),
    )
    op.create_table(
        "workflow_jobs",
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("workflow_id", sa.String(length=36), nullable=False),
        sa.Column("ref", sa.String(length=128), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("pending_parents", sa.Integer(), nullable=False),
        sa.Column("parents_arg", sa.String(length=8), nullable=True),
        sa.Column("settled", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("job_id", name=op.f("pk_workflow_jobs")),
        sa.UniqueConstraint("workflow_id", "ref", name=op.f("uq_workflow_jobs_workflow_id_ref")),
    )
    op.create_table(
        "workflow_edges",
        sa.Column("parent_id", sa.String(length=36), nullable=False),
        sa.Column("child_id", sa.String(length=36), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("parent_id", "child_id", name=op.f("pk_workflow_edges")),
    )
    op.create_index(
        op.f("ix_workflow_edges_child_id"), "workflow_edges", ["child_id"], unique=False
    )
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("workflow_id", sa.String(length=36), nullable=True))
        batch.add_column(sa.Column("parents", sa.JSON(none_as_null=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("parents")
        batch.drop_column("workflow_id")
    op.drop_index(op.f("ix_workflow_edges_child_id"), table_name="workflow_edges")
    op.drop_table("workflow_edges")
    op.drop_table("workflow_jobs")
    op.drop_table("workflows")
