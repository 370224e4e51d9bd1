"""replica points: what a restore point holds, how a session ended on the target, the replica format

Revision ID: 0012
Revises: 0010
Create Date: 2026-11-30 22:40:00.000000

restore_points gain the VM's name, the size (the sum of the disks' virtual sizes), the consistency and the
disks (id, size, format) as the target committed them; rows from before keep empty values (the API shows
them as unknown). session_vms gain the checkpoint's consistency and what the target was told when the VM
ended without a restore point (EndReplicaSession), with a CHECK of its values (written out here, as in
0010: a migration does not follow later changes of the code); rows from before read "" (not told), which
a VM of a session that ended before this revision never needs: the target rolls its replica back at the
next prepare that does not resume it. held_checkpoints gain the consistency; jobs the replica format
("": the host's own).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

_REPLICA_END = ("", "kept", "rolled_back", "nothing", "not_told")


def upgrade() -> None:
    with op.batch_alter_table("restore_points", schema=None) as batch_op:
        batch_op.add_column(sa.Column("vm_name", sa.String(length=256), nullable=False, server_default=""))
        batch_op.add_column(sa.Column("size_bytes", sa.BigInteger(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("consistency", sa.String(length=16), nullable=False, server_default=""))
        batch_op.add_column(sa.Column("disks", sa.JSON(), nullable=False, server_default="[]"))
    with op.batch_alter_table("session_vms", schema=None) as batch_op:
        batch_op.add_column(sa.Column("consistency", sa.String(length=16), nullable=False, server_default="crash"))
        batch_op.add_column(sa.Column("replica_end", sa.String(length=16), nullable=False, server_default=""))
        batch_op.create_check_constraint(
            "ck_session_vms_replica_end", f"replica_end IN ({', '.join(repr(v) for v in _REPLICA_END)})"
        )
    with op.batch_alter_table("held_checkpoints", schema=None) as batch_op:
        batch_op.add_column(sa.Column("consistency", sa.String(length=16), nullable=False, server_default="crash"))
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("replica_format", sa.String(length=8), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("replica_format")
    with op.batch_alter_table("held_checkpoints", schema=None) as batch_op:
        batch_op.drop_column("consistency")
    with op.batch_alter_table("session_vms", schema=None) as batch_op:
        batch_op.drop_constraint("ck_session_vms_replica_end", type_="check")
        batch_op.drop_column("replica_end")
        batch_op.drop_column("consistency")
    with op.batch_alter_table("restore_points", schema=None) as batch_op:
        batch_op.drop_column("disks")
        batch_op.drop_column("consistency")
        batch_op.drop_column("size_bytes")
        batch_op.drop_column("vm_name")
