"""What an operation leaves in the database for a VM: its replica state (replica_vms) and test failovers,
written in the same transaction as the VM's final operation state."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from controller.db.enums import ReplicaVmState
from controller.db.models import Job, JobVm, OperationVm, ReplicaVm, RestorePoint, TestFailover, now
from controller.engine.operations.context import OperationContext
from controller.engine.operations.plans import Operation, Step

DEFAULT_TEST_SECONDS = 24 * 3600
_FAILING_OVER = (Operation.FAILOVER, Operation.PLANNED_FAILOVER)


async def replica_vm(db: AsyncSession, job_id: str, vm_id: str, vm_name: str = "") -> ReplicaVm:
    """The VM's row, made (replicating) when it has none yet."""
    row = await db.scalar(select(ReplicaVm).where(ReplicaVm.job_id == job_id, ReplicaVm.vm_id == vm_id))
    if row is None:
        row = ReplicaVm(job_id=job_id, vm_id=vm_id, vm_name=vm_name, state=ReplicaVmState.REPLICATING, since=now())
        db.add(row)
        await db.flush()
    return row


def _failed_over(rv: ReplicaVm, ctx: OperationContext, data: dict[str, Any], point_id: str) -> None:
    rv.state = ReplicaVmState.FAILED_OVER
    rv.point_id = point_id
    rv.mount_id = str(data.get("mount_id", ""))
    rv.host_id = ctx.failover_host_id
    rv.running_vm_id = str(data.get("running_vm_id", ""))
    rv.running_vm_name = str(data.get("running_vm_name", ""))
    rv.folder = str(data.get("host_folder") or data.get("folder") or "")


def _replicating(rv: ReplicaVm) -> None:
    rv.state = ReplicaVmState.REPLICATING
    rv.point_id = rv.mount_id = rv.host_id = rv.running_vm_id = rv.running_vm_name = rv.folder = ""


async def _settle(db: AsyncSession, ctx: OperationContext, row: OperationVm) -> ReplicaVm:
    rv = await replica_vm(db, ctx.job_id, row.vm_id, row.vm_name)
    rv.busy_session_id = ""
    rv.session_id = ctx.session_id
    rv.since = now()
    return rv


async def record_done(db: AsyncSession, ctx: OperationContext, row: OperationVm) -> None:
    rv = await _settle(db, ctx, row)
    op = ctx.operation
    if op in _FAILING_OVER:
        _failed_over(rv, ctx, row.data, row.point_id)
    elif op is Operation.COMMIT_FAILBACK and row.data.get("new_host_id"):
        _replicating(rv)  # the original left the job: the new VM (a VM of its own) is replicated instead
        rv.state = ReplicaVmState.PERMANENT
    elif op in (Operation.UNDO_FAILOVER, Operation.COMMIT_FAILBACK):
        _replicating(rv)
    elif op is Operation.FAILBACK:
        rv.state = ReplicaVmState.FAILED_BACK
    elif op is Operation.UNDO_FAILBACK:
        rv.state = ReplicaVmState.FAILED_OVER
    elif op is Operation.PERMANENT_FAILOVER:
        await _leave_job(db, ctx, row, rv)
    elif op is Operation.TEST_FAILOVER:
        _add_test(db, ctx, row)
    elif op is Operation.STOP_TEST:
        await db.execute(delete(TestFailover).where(TestFailover.id == str(row.data.get("test_id", ""))))


async def _leave_job(db: AsyncSession, ctx: OperationContext, row: OperationVm, rv: ReplicaVm) -> None:
    """The VM is the production VM now: its restore points' rows go (the replica went with DeleteReplica), and
    the job no longer names it (by id or by name)."""
    rv.state = ReplicaVmState.PERMANENT
    rv.mount_id = rv.point_id = ""
    await db.execute(delete(RestorePoint).where(RestorePoint.job_id == ctx.job_id, RestorePoint.vm_id == row.vm_id))
    await db.execute(delete(JobVm).where(JobVm.job_id == ctx.job_id, JobVm.vm_ref.in_([row.vm_id, row.vm_name])))
    if ctx.request.replicate_back_job:
        await _back_job(db, ctx, row)


def back_job_root(job: Job, name: str) -> str:
    """The replica root of the job a permanent failover makes to replicate the VM back: next to the job's."""
    parent = job.replica_root.rsplit("/", 1)[0] if "/" in job.replica_root else "replicas"
    return f"{parent}/{name}"


# The settings a job replicating a VM back takes from the job it left (no schedule: started by hand first).
_COPIED = (
    "restore_points_to_keep",
    "compression",
    "block_size",
    "bandwidth_limit_mbps",
    "change_tracking",
    "checkpoint_hold_seconds",
    "retries",
    "retry_wait_seconds",
    "full_check_every",
)


async def _back_job(db: AsyncSession, ctx: OperationContext, row: OperationVm) -> None:
    """The job replicating the (now production) VM from the failover host to the job's target."""
    name = ctx.request.replicate_back_job
    job = await db.get(Job, ctx.job_id)
    if job is None or await db.scalar(select(Job.id).where(Job.name == name)) is not None:
        row.error = f"jobs/{name} was not created: the name was taken meanwhile"
        return
    back = Job(
        name=name,
        host_id=ctx.failover_host_id,
        target_id=job.target_id,
        replica_root=back_job_root(job, name),
        **{k: getattr(job, k) for k in _COPIED},
    )
    back.vms = [JobVm(vm_ref=str(row.data.get("running_vm_id", "")))]
    db.add(back)


def _add_test(db: AsyncSession, ctx: OperationContext, row: OperationVm) -> None:
    seconds = ctx.request.time_limit_seconds or DEFAULT_TEST_SECONDS
    started = now()
    db.add(
        TestFailover(
            id=str(row.data["test_id"]),
            job_id=ctx.job_id,
            vm_id=row.vm_id,
            point_id=row.point_id,
            mount_id=str(row.data.get("mount_id", "")),
            host_id=ctx.failover_host_id,
            test_vm_id=str(row.data.get("running_vm_id", "")),
            test_vm_name=str(row.data.get("running_vm_name", "")),
            started_at=started,
            deadline=started + dt.timedelta(seconds=seconds),
            session_id=ctx.session_id,
        )
    )


async def record_failed(db: AsyncSession, ctx: OperationContext, row: OperationVm, failed: Step) -> None:
    """A VM left where a step failed, with no way back (or its undo failed too): recorded so the operation that
    cleans up finds what exists. A failover's mount and VM become FAILED_OVER (undo-failover removes them), a
    test's a test failover (stop-test removes it); a failback that started the original VM is FAILED_BACK."""
    rv = await _settle(db, ctx, row)
    op = ctx.operation
    if op in _FAILING_OVER and row.data.get("mount_id"):
        _failed_over(rv, ctx, row.data, row.point_id)
    elif op in _FAILING_OVER:
        rv.state = ReplicaVmState(str(row.data.get("from_state", ReplicaVmState.REPLICATING.value)))
    elif op is Operation.FAILBACK:
        rv.state = ReplicaVmState.FAILED_BACK if failed is Step.FINISH_TRANSFER else ReplicaVmState.FAILED_OVER
    elif op is Operation.TEST_FAILOVER and row.data.get("mount_id"):
        _add_test(db, ctx, row)
    elif op is Operation.STOP_TEST:
        await _test_not_stopping(db, row)


async def record_rolled_back(db: AsyncSession, ctx: OperationContext, row: OperationVm) -> None:
    """Undone: the VM's state as before the operation."""
    rv = await _settle(db, ctx, row)
    rv.state = ReplicaVmState(str(row.data.get("from_state", rv.state.value)))
    if ctx.operation is Operation.STOP_TEST:  # the test is still there: the deadline loop may stop it again
        await _test_not_stopping(db, row)


async def _test_not_stopping(db: AsyncSession, row: OperationVm) -> None:
    test = await db.get(TestFailover, str(row.data.get("test_id", "")))
    if test is not None:
        test.stop_session_id = ""


async def release(db: AsyncSession, session_id: str, row: OperationVm) -> None:
    """A row ended without its run (the session could not start): the VM's claim lifted; a VM never begun is
    as it was."""
    rv = await db.scalar(select(ReplicaVm).where(ReplicaVm.busy_session_id == session_id, ReplicaVm.vm_id == row.vm_id))
    if rv is None:
        return
    rv.busy_session_id = ""
    if row.started_at is None:
        rv.state = ReplicaVmState(str(row.data.get("from_state", rv.state.value)))
