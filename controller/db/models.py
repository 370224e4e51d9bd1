"""Tables of the configuration database. Every change of state is written here before it is acted on."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from controller.db.enums import (
    Notification,
    OperationStepState,
    ReplicaEnd,
    ReplicaVmState,
    SessionKind,
    SessionState,
    TaskState,
    VmState,
)
from controller.db.types import UtcDateTime, state_type
from vmrepl.domain import DEFAULT_SLOTS, JOB_DEFAULTS, Consistency


def new_id() -> str:
    return uuid.uuid4().hex


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, dt.datetime: UtcDateTime()}


class Credential(Base):
    """A user name and a secret, the secret encrypted at rest (controller.db.secrets)."""

    __tablename__ = "credentials"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    username: Mapped[str] = mapped_column(String(256))
    secret: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[dt.datetime] = mapped_column(default=now)


class Installation(Base):
    """The one row naming this controller installation (every controller of one database: HA peers share
    it). Hyper-V recovery checkpoints are named `vmrepl-<id>-...`, so an installation removes its own
    leftovers and never another installation's checkpoints of the same VM."""

    __tablename__ = "installation"
    id: Mapped[str] = mapped_column(String(16), primary_key=True)


class Host(Base):
    """A hypervisor host: provider "file" (address is a folder) or "hyperv" (address is a host name)."""

    __tablename__ = "hosts"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    provider: Mapped[str] = mapped_column(String(32))
    address: Mapped[str] = mapped_column(String(1024))
    credential_id: Mapped[str | None] = mapped_column(ForeignKey("credentials.id", ondelete="RESTRICT"))
    created_at: Mapped[dt.datetime] = mapped_column(default=now)
    # How a `hyperv` host is reached (controller/engine/providers.py WinRm fields); {}: the defaults.
    winrm: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Proxy(Base):
    __tablename__ = "proxies"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    address: Mapped[str] = mapped_column(String(256))
    # The name in the agent's certificate, when it differs from the host in address.
    tls_server_name: Mapped[str] = mapped_column(String(256), default="")
    max_tasks: Mapped[int] = mapped_column(Integer, default=DEFAULT_SLOTS)
    # Host ids this proxy reads from directly (preferred for their VMs); empty: any host.
    host_ids: Mapped[list[Any]] = mapped_column(default=list)


class Target(Base):
    __tablename__ = "targets"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    address: Mapped[str] = mapped_column(String(256))
    tls_server_name: Mapped[str] = mapped_column(String(256), default="")
    max_tasks: Mapped[int] = mapped_column(Integer, default=DEFAULT_SLOTS)


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    host_id: Mapped[str] = mapped_column(ForeignKey("hosts.id", ondelete="RESTRICT"))
    target_id: Mapped[str] = mapped_column(ForeignKey("targets.id", ondelete="RESTRICT"))
    # Replica folder on the target, relative to its datastore; each VM gets a subfolder.
    replica_root: Mapped[str] = mapped_column(String(512))
    restore_points_to_keep: Mapped[int] = mapped_column(Integer, default=JOB_DEFAULTS.restore_points_to_keep)
    compression: Mapped[str] = mapped_column(String(16), default=JOB_DEFAULTS.compression.value)  # domain.Compression
    block_size: Mapped[int] = mapped_column(Integer, default=JOB_DEFAULTS.block_size)
    bandwidth_limit_mbps: Mapped[float] = mapped_column(default=0.0)
    change_tracking: Mapped[str] = mapped_column(String(8), default=JOB_DEFAULTS.change_tracking.value)  # on, off, auto
    # guest_processing goes to the guest hook (engine/runtime.py); exclusions are stored and shown but not
    # applied until the guest file-system reader exists (protocol.md); schedule drives the scheduler.
    guest_processing: Mapped[dict[str, Any]] = mapped_column(default=dict)
    exclusions: Mapped[dict[str, Any]] = mapped_column(default=dict)
    schedule: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # How long a checkpoint is held for disks left to resume (HeldCheckpoint.deadline is when that ends).
    checkpoint_hold_seconds: Mapped[int] = mapped_column(Integer, default=JOB_DEFAULTS.checkpoint_hold_seconds)
    # A VM that fails is tried again this many times in the same session, after a wait.
    retries: Mapped[int] = mapped_column(Integer, default=JOB_DEFAULTS.retries)
    retry_wait_seconds: Mapped[int] = mapped_column(Integer, default=JOB_DEFAULTS.retry_wait_seconds)
    # Every this many sessions of a VM, an incremental that would use changed ranges compares every block's
    # digest instead (a full check, engine.states.full_check_due); 0: never.
    full_check_every: Mapped[int] = mapped_column(Integer, default=JOB_DEFAULTS.full_check_every)
    # The scheduler's bookmark: slots (or upstream runs) up to here are handled; later ones are due.
    schedule_handled_until: Mapped[dt.datetime | None]
    # POSTed a JSON summary when a session ends: {"sealed_url": the URL sealed like a credential's secret
    # (controller.db.secrets), "shown_url": its redacted form for replies, "failures_only": bool}; {} none.
    webhook: Mapped[dict[str, Any]] = mapped_column(default=dict)
    enabled: Mapped[bool] = mapped_column(default=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=now)
    # The replica disks' file format ("raw", "vhdx"); "": the host's own (vmrepl.domain.replica_format).
    replica_format: Mapped[str] = mapped_column(String(8), default="")
    # Failover (docs/failover.md): the host failed-over and test VMs run on (None: failover is refused), each
    # source switch's counterpart there ([{"source_switch": str, "target_switch": str}]), and the target next
    # to the original host that writes the original disks in a failback (None: the job's target).
    failover_host_id: Mapped[str | None] = mapped_column(ForeignKey("hosts.id", ondelete="RESTRICT"), default=None)
    network_mapping: Mapped[list[Any]] = mapped_column(default=list)
    failback_target_id: Mapped[str | None] = mapped_column(ForeignKey("targets.id", ondelete="RESTRICT"), default=None)
    vms: Mapped[list[JobVm]] = relationship(back_populates="job", cascade="all, delete-orphan", lazy="selectin")

    @property
    def has_webhook(self) -> bool:
        return bool(self.webhook and self.webhook.get("sealed_url"))


class JobVm(Base):
    __tablename__ = "job_vms"
    __table_args__ = (UniqueConstraint("job_id", "vm_ref"),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    vm_ref: Mapped[str] = mapped_column(String(256))  # VM id or name
    excluded_disks: Mapped[list[Any]] = mapped_column(default=list)
    job: Mapped[Job] = relationship(back_populates="vms")


class Session(Base):
    __tablename__ = "sessions"
    # ListSessions pages by (started_at, id), newest first, over all jobs or one (controller.api.paging).
    __table_args__ = (
        Index("ix_sessions_started_at_id", "started_at", "id"),
        Index("ix_sessions_job_id_started_at_id", "job_id", "started_at", "id"),
    )
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    state: Mapped[SessionState] = mapped_column(state_type(SessionState, constraint="ck_sessions_state"), index=True)
    started_at: Mapped[dt.datetime] = mapped_column(default=now)
    ended_at: Mapped[dt.datetime | None]
    error: Mapped[str] = mapped_column(Text, default="")
    # The job's webhook for this session (NONE when the job has none).
    notification: Mapped[Notification] = mapped_column(
        state_type(Notification, constraint="ck_sessions_notification"), default=Notification.NONE
    )
    # Started with StartJob's full_check: every VM's incremental is a full check, whatever the count says.
    full_check: Mapped[bool] = mapped_column(default=False)
    kind: Mapped[SessionKind] = mapped_column(
        state_type(SessionKind, constraint="ck_sessions_kind"), default=SessionKind.REPLICATION
    )
    # OPERATION: controller.engine.operations.plans.Operation's value, and the request's settings as JSON
    # (point, time limit, test id, replicate-back job, failback host), read again when a crash resumes it.
    operation: Mapped[str] = mapped_column(String(32), default="")
    request: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # REPLICATION limited to these VM ids (a planned failover's last incremental); empty: every VM of the job.
    only_vms: Mapped[list[Any]] = mapped_column(default=list)


class OperationVm(Base):
    """One VM in an operation session: its group, the step under way (written before it acts) and figures."""

    __tablename__ = "operation_vms"
    __table_args__ = (UniqueConstraint("session_id", "vm_id"),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"), index=True)
    vm_id: Mapped[str] = mapped_column(String(256))
    vm_name: Mapped[str] = mapped_column(String(256))
    group: Mapped[int] = mapped_column("group_index", Integer, default=0)
    state: Mapped[OperationStepState] = mapped_column(
        state_type(OperationStepState, constraint="ck_operation_vms_state"), default=OperationStepState.PLANNED
    )
    step: Mapped[str] = mapped_column(String(32), default="")
    point_id: Mapped[str] = mapped_column(String(64), default="")
    error: Mapped[str] = mapped_column(Text, default="")
    # What the steps found and the next ones need (mount id, the registered VM's id, ...), and for a rollback
    # the steps left to undo: controller.engine.operations.runner keeps it.
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
    bytes_copied: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_read: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_sent: Mapped[int] = mapped_column(BigInteger, default=0)
    blocks_differing: Mapped[int] = mapped_column(BigInteger, default=0)
    started_at: Mapped[dt.datetime | None]
    ended_at: Mapped[dt.datetime | None]


class ReplicaVm(Base):
    """Where one VM of a job stands (no row: replicating, as before any operation)."""

    __tablename__ = "replica_vms"
    __table_args__ = (UniqueConstraint("job_id", "vm_id"),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    vm_id: Mapped[str] = mapped_column(String(256))
    vm_name: Mapped[str] = mapped_column(String(256), default="")
    state: Mapped[ReplicaVmState] = mapped_column(
        state_type(ReplicaVmState, constraint="ck_replica_vms_state"), default=ReplicaVmState.REPLICATING
    )
    # The operation session working on the VM now ("" none): a second operation is refused meanwhile.
    busy_session_id: Mapped[str] = mapped_column(String(32), default="")
    # The last operation's session.
    session_id: Mapped[str] = mapped_column(String(32), default="")
    # FAILED_OVER and after: the point failed over to (held from retention), the target's mount, where the
    # failed-over VM runs.
    point_id: Mapped[str] = mapped_column(String(64), default="")
    mount_id: Mapped[str] = mapped_column(String(64), default="")
    host_id: Mapped[str] = mapped_column(String(32), default="")
    running_vm_id: Mapped[str] = mapped_column(String(256), default="")
    running_vm_name: Mapped[str] = mapped_column(String(256), default="")
    folder: Mapped[str] = mapped_column(Text, default="")
    since: Mapped[dt.datetime] = mapped_column(default=now)


class TestFailover(Base):
    """A running test failover: a point started as an isolated copy while replication goes on."""

    __tablename__ = "test_failovers"
    __test__ = False  # not a pytest class
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    vm_id: Mapped[str] = mapped_column(String(256))
    point_id: Mapped[str] = mapped_column(String(64))
    mount_id: Mapped[str] = mapped_column(String(64))
    host_id: Mapped[str] = mapped_column(String(32))
    test_vm_id: Mapped[str] = mapped_column(String(256), default="")
    test_vm_name: Mapped[str] = mapped_column(String(256), default="")
    started_at: Mapped[dt.datetime] = mapped_column(default=now)
    deadline: Mapped[dt.datetime]
    session_id: Mapped[str] = mapped_column(String(32))
    # The STOP_TEST session removing it ("" none yet): the deadline loop starts one only once.
    stop_session_id: Mapped[str] = mapped_column(String(32), default="")


class SessionVm(Base):
    """One VM in one session: its checkpoint and how far the session got with it."""

    __tablename__ = "session_vms"
    __table_args__ = (UniqueConstraint("session_id", "vm_id"),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"), index=True)
    vm_id: Mapped[str] = mapped_column(String(256))
    vm_name: Mapped[str] = mapped_column(String(256))
    state: Mapped[VmState] = mapped_column(state_type(VmState, constraint="ck_session_vms_state"))
    checkpoint_id: Mapped[str] = mapped_column(String(128), default="")
    checkpoint_reference: Mapped[str] = mapped_column(Text, default="")
    restore_point_id: Mapped[str] = mapped_column(String(64), default="")
    error: Mapped[str] = mapped_column(Text, default="")
    # 1 for the first try; a retry after a failure takes a new checkpoint and runs every disk again.
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    # The checkpoint's consistency (vmrepl.domain.Consistency), known when it is taken.
    consistency: Mapped[str] = mapped_column(String(16), default=Consistency.CRASH.value)
    # What the target was told when the VM ended without a restore point (EndReplicaSession).
    replica_end: Mapped[ReplicaEnd] = mapped_column(
        state_type(ReplicaEnd, constraint="ck_session_vms_replica_end"), default=ReplicaEnd.UNTOLD
    )
    # The VM's configuration as the provider captured it at the checkpoint, kept with the restore point.
    vm_configuration: Mapped[bytes | None] = mapped_column(LargeBinary, default=None)
    # Why the checkpoint is crash-consistent where application consistency was asked ("" otherwise).
    consistency_fallback: Mapped[str] = mapped_column(Text, default="")
    # The provider has made the checkpoint the reference later sessions ask changes against
    # (Provider.keep_reference); on Hyper-V that removed the checkpoint.
    reference_kept: Mapped[bool] = mapped_column(default=False)
    # That reference is gone: dropped once a newer point of the job was committed, or its own point never was.
    reference_dropped: Mapped[bool] = mapped_column(default=False)


class Task(Base):
    """One disk of one VM in one session."""

    __tablename__ = "tasks"
    __table_args__ = (UniqueConstraint("session_id", "vm_id", "disk_id"),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"), index=True)
    vm_id: Mapped[str] = mapped_column(String(256))
    vm_name: Mapped[str] = mapped_column(String(256))
    disk_id: Mapped[str] = mapped_column(String(128))
    state: Mapped[TaskState] = mapped_column(state_type(TaskState, constraint="ck_tasks_state"))
    proxy_id: Mapped[str | None] = mapped_column(ForeignKey("proxies.id", ondelete="SET NULL"))
    transfer_id: Mapped[str] = mapped_column(String(64), default="")
    checkpoint_id: Mapped[str] = mapped_column(String(128), default="")
    committed_offset: Mapped[int] = mapped_column(BigInteger, default=0)
    disk_size: Mapped[int] = mapped_column(BigInteger, default=0)
    # The transfer's figures as the proxy last reported them: vmrepl.progress.TransferFigures, in its JSON form.
    stats: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str] = mapped_column(Text, default="")
    started_at: Mapped[dt.datetime | None]
    ended_at: Mapped[dt.datetime | None]
    # How this disk starts (states.DiskStart) and, once decided, its change source: a resumed transfer
    # must recompute exactly the same one, so the mode and the reference are kept, not the ranges.
    start: Mapped[str] = mapped_column(String(16), default="fresh")
    change_mode: Mapped[str] = mapped_column(String(16), default="")  # full, ranges, compare; "" undecided
    since_reference: Mapped[str] = mapped_column(Text, default="")
    # The digest comparison (change_mode compare) is a full check standing in for changed ranges since
    # since_reference: the blocks it finds differing outside those ranges are reported as repaired.
    full_check: Mapped[bool] = mapped_column(default=False)
    # Why this disk compared digests where the job would use the host's change tracking ("" otherwise).
    fallback_reason: Mapped[str] = mapped_column(Text, default="")
    # The earlier session whose transfer of this disk this task continues (DiskStart.RESUME).
    resume_session_id: Mapped[str] = mapped_column(String(32), default="")


class HeldCheckpoint(Base):
    """A checkpoint kept after its session for disks left to resume, until resumed or past its deadline."""

    __tablename__ = "held_checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "vm_id"),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    vm_id: Mapped[str] = mapped_column(String(256))
    checkpoint_id: Mapped[str] = mapped_column(String(128))
    reference: Mapped[str] = mapped_column(Text)
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"))
    deadline: Mapped[dt.datetime]
    consistency: Mapped[str] = mapped_column(String(16), default=Consistency.CRASH.value)


class RestorePoint(Base):
    __tablename__ = "restore_points"
    __table_args__ = (Index("ix_restore_points_job_id_created_at_id", "job_id", "created_at", "id"),)
    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # the target's id
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    vm_id: Mapped[str] = mapped_column(String(256))
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"))
    created_at: Mapped[dt.datetime] = mapped_column(default=now)
    # The change-tracking reference of the checkpoint this point was taken from: the next incremental's "since".
    reference: Mapped[str] = mapped_column(Text, default="")
    vm_name: Mapped[str] = mapped_column(String(256), default="")
    # The sum of its disks' virtual sizes.
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    # vmrepl.domain.Consistency; "" for a point recorded before points kept it.
    consistency: Mapped[str] = mapped_column(String(16), default="")
    # [{"disk_id": str, "disk_size": int, "format": "raw" | "vhdx"}] as the target committed them.
    disks: Mapped[list[Any]] = mapped_column(default=list)
    # The VM's configuration at the point's checkpoint (also kept on the target with the point).
    vm_configuration: Mapped[bytes | None] = mapped_column(LargeBinary, default=None)
