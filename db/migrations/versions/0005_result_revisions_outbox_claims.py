"""result revisions (revision, content key, predecessor); outbox claims (lease owner/expiry)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29 23:40:00.000000

``results`` keeps every revision of a study's result with its number, the sha256 of its
content and the SR it replaces; ``deliveries`` gets the claim of a sender (SENDING with a
lease).
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
    """Add the revision columns to results and the claim columns to deliveries."""
    with op.batch_alter_table("results") as batch:
        batch.add_column(sa.Column("revision", sa.Integer(), nullable=False, server_default="1"))
        batch.add_column(sa.Column("content_key", sa.String(64), nullable=True))
        batch.add_column(sa.Column("predecessor_sop_instance_uid", sa.String(64), nullable=True))
    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(sa.Column("lease_owner", sa.String(128), nullable=True))
        batch.add_column(sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    """Drop the columns again."""
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_column("lease_expires_at")
        batch.drop_column("lease_owner")
    with op.batch_alter_table("results") as batch:
        batch.drop_column("predecessor_sop_instance_uid")
        batch.drop_column("content_key")
        batch.drop_column("revision")
