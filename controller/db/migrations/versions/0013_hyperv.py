"""Hyper-V hosts: WinRM settings, RCT references, VM configurations, change-tracking fallbacks

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-01 01:30:00.000000

hosts.winrm: how a `hyperv` host is reached (scheme, port, auth, CA bundle; see controller.proto
WinRmSettings); {} for rows from before (the defaults). References become Text: a Hyper-V reference names the
reference point and one RCT id per disk (vmrepl/providers/hyperv/reference.py), longer than the 256 characters
a file host's `seq:N` needed. session_vms gain the VM's configuration captured at the checkpoint (kept with
the restore point, restore_points.vm_configuration), why the checkpoint is crash-consistent where application
consistency was asked, whether the checkpoint was turned into the reference later sessions ask changes
against (Provider.keep_reference; Hyper-V's ConvertToReferencePoint removes the checkpoint), and whether that
reference was dropped since. tasks gain why the disk compared
digests instead of using the host's change tracking. `installation` holds one random id naming this
installation (its Hyper-V checkpoints are `vmrepl-<id>-...`), made here once.
"""

from __future__ import annotations

import secrets

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

_REFERENCES = (
    ("session_vms", "checkpoint_reference"),
    ("tasks", "since_reference"),
    ("held_checkpoints", "reference"),
    ("restore_points", "reference"),
)


def upgrade() -> None:
    installation = op.create_table("installation", sa.Column("id", sa.String(16), primary_key=True))
    op.bulk_insert(installation, [{"id": secrets.token_hex(4)}])
    with op.batch_alter_table("hosts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("winrm", sa.JSON(), nullable=False, server_default="{}"))
    for table, column in _REFERENCES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.alter_column(column, existing_type=sa.String(256), type_=sa.Text())
    with op.batch_alter_table("session_vms", schema=None) as batch_op:
        batch_op.add_column(sa.Column("vm_configuration", sa.LargeBinary(), nullable=True))
        batch_op.add_column(sa.Column("consistency_fallback", sa.Text(), nullable=False, server_default=""))
        batch_op.add_column(sa.Column("reference_kept", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.add_column(sa.Column("reference_dropped", sa.Boolean(), nullable=False, server_default=sa.false()))
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("fallback_reason", sa.Text(), nullable=False, server_default=""))
    with op.batch_alter_table("restore_points", schema=None) as batch_op:
        batch_op.add_column(sa.Column("vm_configuration", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    op.drop_table("installation")
    with op.batch_alter_table("restore_points", schema=None) as batch_op:
        batch_op.drop_column("vm_configuration")
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_column("fallback_reason")
    with op.batch_alter_table("session_vms", schema=None) as batch_op:
        batch_op.drop_column("reference_dropped")
        batch_op.drop_column("reference_kept")
        batch_op.drop_column("consistency_fallback")
        batch_op.drop_column("vm_configuration")
    for table, column in _REFERENCES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.alter_column(column, existing_type=sa.Text(), type_=sa.String(256))
    with op.batch_alter_table("hosts", schema=None) as batch_op:
        batch_op.drop_column("winrm")
