"""studies: accession number and study date, indexes for finding a study by them

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 23:40:00.000000

``radflag studies`` and the dashboard show the Accession Number (0008,0050) and Study Date
(0008,0020) so that an administrator can match a row to the RIS; ``radflag studies find``
looks studies up by accession number or by the keyed hash of the patient ID.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add the two columns and their lookup indexes."""
    op.add_column("studies", sa.Column("accession_number", sa.String(16), nullable=True))
    op.add_column("studies", sa.Column("study_date", sa.String(8), nullable=True))
    op.create_index("ix_studies_accession_number", "studies", ["accession_number"])
    op.create_index("ix_studies_patient_key", "studies", ["patient_key"])


def downgrade() -> None:
    """Drop the indexes and columns."""
    op.drop_index("ix_studies_patient_key", table_name="studies")
    op.drop_index("ix_studies_accession_number", table_name="studies")
    with op.batch_alter_table("studies") as batch:
        batch.drop_column("study_date")
        batch.drop_column("accession_number")
