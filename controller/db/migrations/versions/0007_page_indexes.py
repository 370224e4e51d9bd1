"""indexes for keyset pages

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 17:30:00.000000

ListSessions and ListJobRestorePoints page by key (controller.api.paging): each page is an indexed range read.
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_sessions_started_at_id", "sessions", ["started_at", "id"])
    op.create_index("ix_sessions_job_id_started_at_id", "sessions", ["job_id", "started_at", "id"])
    op.create_index("ix_restore_points_job_id_created_at_id", "restore_points", ["job_id", "created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_restore_points_job_id_created_at_id", table_name="restore_points")
    op.drop_index("ix_sessions_job_id_started_at_id", table_name="sessions")
    op.drop_index("ix_sessions_started_at_id", table_name="sessions")
