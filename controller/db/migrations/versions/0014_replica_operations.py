"""replica operations: failover, failback and test failover (docs/failover.md)

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-01 04:30:00.000000

sessions gain their kind (replication, or a replica operation), the operation and its request's settings, and
the VM ids a replication session is limited to (a planned failover's last incremental); rows from before are
replication sessions of every VM. operation_vms: one row per VM of an operation session, the step under way
written before it acts. replica_vms: where a VM of a job stands (failed over, failed back, ...); no row reads
as replicating. test_failovers: the test copies running. jobs gain the failover host, the network mapping
and the failback target. State values are written out here, as in 0010: a migration does not follow later
changes of the code.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from controller.db.types import UtcDateTime

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

_KIND = ("replication", "operation")
_STEP = ("planned", "running", "rolling_back", "done", "failed", "rolled_back")
_REPLICA = ("replicating", "failing_over", "failed_over", "failing_back", "failed_back", "permanent")


def _check(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def _ids() -> list[sa.Column[str]]:
    return [sa.Column("id", sa.String(32), primary_key=True)]


def upgrade() -> None:
    with op.batch_alter_table("sessions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("kind", sa.String(16), nullable=False, server_default="replication"))
        batch_op.add_column(sa.Column("operation", sa.String(32), nullable=False, server_default=""))
        batch_op.add_column(sa.Column("request", sa.JSON(), nullable=False, server_default="{}"))
        batch_op.add_column(sa.Column("only_vms", sa.JSON(), nullable=False, server_default="[]"))
        batch_op.create_check_constraint("ck_sessions_kind", _check("kind", _KIND))
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("failover_host_id", sa.String(32), nullable=True))
        batch_op.add_column(sa.Column("network_mapping", sa.JSON(), nullable=False, server_default="[]"))
        batch_op.add_column(sa.Column("failback_target_id", sa.String(32), nullable=True))
        batch_op.create_foreign_key(
            "fk_jobs_failover_host_id_hosts", "hosts", ["failover_host_id"], ["id"], ondelete="RESTRICT"
        )
        batch_op.create_foreign_key(
            "fk_jobs_failback_target_id_targets", "targets", ["failback_target_id"], ["id"], ondelete="RESTRICT"
        )
    _operation_vms()
    _replica_vms()
    _test_failovers()


def _operation_vms() -> None:
    op.create_table(
        "operation_vms",
        *_ids(),
        sa.Column("session_id", sa.String(32), sa.ForeignKey("sessions.id", ondelete="CASCADE"), nullable=False),
        sa.Column("vm_id", sa.String(256), nullable=False),
        sa.Column("vm_name", sa.String(256), nullable=False),
        sa.Column("group_index", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("step", sa.String(32), nullable=False),
        sa.Column("point_id", sa.String(64), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("bytes_copied", sa.BigInteger(), nullable=False),
        sa.Column("bytes_read", sa.BigInteger(), nullable=False),
        sa.Column("bytes_sent", sa.BigInteger(), nullable=False),
        sa.Column("blocks_differing", sa.BigInteger(), nullable=False),
        sa.Column("started_at", UtcDateTime(), nullable=True),
        sa.Column("ended_at", UtcDateTime(), nullable=True),
        sa.UniqueConstraint("session_id", "vm_id"),
        sa.CheckConstraint(_check("state", _STEP), name="ck_operation_vms_state"),
    )
    op.create_index("ix_operation_vms_session_id", "operation_vms", ["session_id"])


def _replica_vms() -> None:
    op.create_table(
        "replica_vms",
        *_ids(),
        sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("vm_id", sa.String(256), nullable=False),
        sa.Column("vm_name", sa.String(256), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("busy_session_id", sa.String(32), nullable=False),
        sa.Column("session_id", sa.String(32), nullable=False),
        sa.Column("point_id", sa.String(64), nullable=False),
        sa.Column("mount_id", sa.String(64), nullable=False),
        sa.Column("host_id", sa.String(32), nullable=False),
        sa.Column("running_vm_id", sa.String(256), nullable=False),
        sa.Column("running_vm_name", sa.String(256), nullable=False),
        sa.Column("folder", sa.Text(), nullable=False),
        sa.Column("since", UtcDateTime(), nullable=False),
        sa.UniqueConstraint("job_id", "vm_id"),
        sa.CheckConstraint(_check("state", _REPLICA), name="ck_replica_vms_state"),
    )
    op.create_index("ix_replica_vms_job_id", "replica_vms", ["job_id"])


def _test_failovers() -> None:
    op.create_table(
        "test_failovers",
        *_ids(),
        sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("vm_id", sa.String(256), nullable=False),
        sa.Column("point_id", sa.String(64), nullable=False),
        sa.Column("mount_id", sa.String(64), nullable=False),
        sa.Column("host_id", sa.String(32), nullable=False),
        sa.Column("test_vm_id", sa.String(256), nullable=False),
        sa.Column("test_vm_name", sa.String(256), nullable=False),
        sa.Column("started_at", UtcDateTime(), nullable=False),
        sa.Column("deadline", UtcDateTime(), nullable=False),
        sa.Column("session_id", sa.String(32), nullable=False),
        sa.Column("stop_session_id", sa.String(32), nullable=False),
    )
    op.create_index("ix_test_failovers_job_id", "test_failovers", ["job_id"])


def downgrade() -> None:
    op.drop_table("test_failovers")
    op.drop_table("replica_vms")
    op.drop_table("operation_vms")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_constraint("fk_jobs_failback_target_id_targets", type_="foreignkey")
        batch_op.drop_constraint("fk_jobs_failover_host_id_hosts", type_="foreignkey")
        batch_op.drop_column("failback_target_id")
        batch_op.drop_column("network_mapping")
        batch_op.drop_column("failover_host_id")
    with op.batch_alter_table("sessions", schema=None) as batch_op:
        batch_op.drop_constraint("ck_sessions_kind", type_="check")
        batch_op.drop_column("only_vms")
        batch_op.drop_column("request")
        batch_op.drop_column("operation")
        batch_op.drop_column("kind")
