"""bind worker registrations and leases to the API key that made them

Revision ID: 0005
Revises: 0004
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
    # Plain ADD COLUMN everywhere (batch mode does not rebuild SQLite's table for it).
    # Leases running during the upgrade keep a NULL lease_key, which any key may settle:
    # refusing them would re-run every job in flight.
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("lease_key", sa.String(length=64), nullable=True))
    # Registrations from before the upgrade belong to no key: a keyed worker's next
    # heartbeat answers 404 and it registers again.
    with op.batch_alter_table("workers") as batch:
        batch.add_column(
            sa.Column("key_id", sa.String(length=64), server_default="", nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.drop_column("key_id")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("lease_key")
