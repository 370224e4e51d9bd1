"""periodic full check

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-30 22:30:00.000000

jobs.full_check_every: every this many sessions a VM's incremental compares every block's digest instead of
trusting the host's changed ranges (0: never; rows of earlier versions get the default, 10).
sessions.full_check: the session was started with StartJob's full_check (every VM checked).
tasks.full_check: this disk's digest comparison was such a full check (its figures' repaired blocks are
writes the change tracking missed).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Server defaults so rows made by earlier versions get values.
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("full_check_every", sa.Integer(), nullable=False, server_default="10"))
    with op.batch_alter_table("sessions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("full_check", sa.Boolean(), nullable=False, server_default=sa.false()))
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("full_check", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_column("full_check")
    with op.batch_alter_table("sessions", schema=None) as batch_op:
        batch_op.drop_column("full_check")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("full_check_every")
