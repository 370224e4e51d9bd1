"""checkpoint hold seconds; dead columns

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30 20:00:00.000000

`jobs.checkpoint_deadline_seconds` becomes `checkpoint_hold_seconds`, the name the API always gave this
duration (a held checkpoint's `deadline` is the instant it ends). `session_vms.checkpoint_reused` was
written and never read.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.alter_column("checkpoint_deadline_seconds", new_column_name="checkpoint_hold_seconds")
    with op.batch_alter_table("session_vms", schema=None) as batch_op:
        batch_op.drop_column("checkpoint_reused")


def downgrade() -> None:
    with op.batch_alter_table("session_vms", schema=None) as batch_op:
        batch_op.add_column(sa.Column("checkpoint_reused", sa.Boolean(), nullable=False, server_default=sa.false()))
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.alter_column("checkpoint_hold_seconds", new_column_name="checkpoint_deadline_seconds")
