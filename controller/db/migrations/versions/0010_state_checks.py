"""state columns checked by the database

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30 20:30:00.000000

The state columns (sessions.state, sessions.notification, session_vms.state, tasks.state) keep their type,
a string of 16 characters, and their values; each gets a CHECK that it holds one of its enum's values
(controller.db.enums as of this revision, written out here: a migration does not follow later changes of
the code). Rows stay as they are. SQLite adds a CHECK only by copying the table, which
controller.db.connect.migrate does with foreign keys off, so the copy's drop of the old table deletes no
child row.
"""

from __future__ import annotations

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

_SESSION = ("running", "stopping", "succeeded", "incomplete", "failed")
_NOTIFICATION = ("", "pending", "sent", "failed", "skipped")
_VM = ("planned", "checkpointing", "transferring", "committing", "releasing", "holding", "done", "held", "stopped")
_TASK = ("pending", "starting", "running", "succeeded", "resumable", "failed")

# table -> (constraint, column, allowed values)
CHECKS: dict[str, list[tuple[str, str, tuple[str, ...]]]] = {
    "sessions": [
        ("ck_sessions_state", "state", _SESSION),
        ("ck_sessions_notification", "notification", _NOTIFICATION),
    ],
    "session_vms": [("ck_session_vms_state", "state", (*_VM, "failed"))],
    "tasks": [("ck_tasks_state", "state", _TASK)],
}


def _condition(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def upgrade() -> None:
    for table, checks in CHECKS.items():
        with op.batch_alter_table(table, schema=None) as batch_op:
            for name, column, values in checks:
                batch_op.create_check_constraint(name, _condition(column, values))


def downgrade() -> None:
    for table, checks in CHECKS.items():
        with op.batch_alter_table(table, schema=None) as batch_op:
            for name, _, _ in checks:
                batch_op.drop_constraint(name, type_="check")
