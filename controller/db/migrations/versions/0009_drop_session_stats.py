"""drop sessions.stats

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30 20:00:00.000000

A session's totals were written at its end and never read: the API sums them from its tasks' figures
(tasks.stats, vmrepl.progress.TransferFigures), live or ended alike.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("stats")


def downgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.add_column(sa.Column("stats", sa.JSON(), nullable=False, server_default="{}"))
