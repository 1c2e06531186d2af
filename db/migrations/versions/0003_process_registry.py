"""process registry (liveness table); audit rows name the process that wrote them

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29 23:30:00.000000

``processes`` has one row per running (or dead) ``radflag serve`` process: host, pid, roles,
start time and the heartbeat it renews by the database clock. A process whose heartbeat is
older than one lease is dead and its work is reclaimed (:mod:`db.cluster`).
``audit_events.process_id`` says which process wrote each audit row. Instance paths stored
absolute by older versions are made relative to the spool root at start-up
(:func:`db.cluster.relativize_instance_paths`): the migration does not know the root.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "processes",
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("roles", sa.String(length=128), nullable=False),
        sa.Column("identity", sa.String(length=64), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("stopped_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("stop_reason", sa.String(length=64), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_processes_host", "processes", ["host"], unique=False)
    # A plain ADD COLUMN (no table rebuild): the append-only triggers of 0002 stay in place.
    op.add_column("audit_events", sa.Column("process_id", sa.String(length=128), nullable=True))


def downgrade() -> None:
    # Native DROP COLUMN (SQLite >= 3.35) instead of a batch rebuild that would drop the
    # append-only triggers of 0002.
    op.execute("ALTER TABLE audit_events DROP COLUMN process_id")
    op.drop_index("ix_processes_host", table_name="processes")
    op.drop_table("processes")
