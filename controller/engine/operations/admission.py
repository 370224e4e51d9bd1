"""StartReplicaOperation's checks and the rows it writes, in the one transaction that claims the VMs: a second
operation on a VM, a session planning it, and retention all see the claim or come before it."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from controller.db.enums import OperationStepState, ReplicaVmState, SessionKind, SessionState
from controller.db.models import (
    Host,
    Job,
    JobVm,
    OperationVm,
    ReplicaVm,
    RestorePoint,
    Session,
    SessionVm,
    TestFailover,
    now,
)
from controller.engine.operations.context import OperationRequest
from controller.engine.operations.holds import held_points
from controller.engine.operations.newloc import NEW_KEYS, NEW_LOCATION_PROVIDERS
from controller.engine.operations.plans import Operation, Plan, check_start
from controller.engine.operations.records import back_job_root, replica_vm
from controller.engine.retention import points_to_delete
from controller.engine.states import ACTIVE_SESSION
from vmrepl.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound

# Providers whose hosts can register VMs (vmrepl.providers.base.Provider.register_vm).
REGISTERING_PROVIDERS = ("file", "hyperv")
_NEEDS_HOST = (Operation.FAILOVER, Operation.PLANNED_FAILOVER, Operation.TEST_FAILOVER)
_NEEDS_POINT = (Operation.FAILOVER, Operation.TEST_FAILOVER)


@dataclass(frozen=True, slots=True)
class VmRef:
    vm_id: str
    vm_name: str


async def resolve_vm(db: AsyncSession, job: Job, ref: str) -> VmRef:
    """A VM of the job by id or name, as its restore points or its replica state know it (the source host may
    be lost: failover never asks it)."""
    rows = list(
        await db.scalars(
            select(ReplicaVm).where(ReplicaVm.job_id == job.id, (ReplicaVm.vm_id == ref) | (ReplicaVm.vm_name == ref))
        )
    )
    # By name, a VM that left the job (permanent failover; the original of a failback committed to a new
    # location, whose new VM may carry its name) comes last: the name is the VM the job replicates now.
    gone = {r.vm_id for r in rows if r.state is ReplicaVmState.PERMANENT}
    chosen = [r for r in rows if r.vm_id == ref] or [r for r in rows if r.vm_id not in gone]
    if chosen:
        return VmRef(chosen[0].vm_id, chosen[0].vm_name or chosen[0].vm_id)
    point = await db.scalar(
        select(RestorePoint)
        .where(
            RestorePoint.job_id == job.id,
            (RestorePoint.vm_id == ref) | (RestorePoint.vm_name == ref),
            RestorePoint.vm_id.not_in(gone),
        )
        .order_by(RestorePoint.created_at.desc())
        .limit(1)
    )
    if point is not None:
        return VmRef(point.vm_id, point.vm_name or point.vm_id)
    if rows:  # only a VM that left the job: its refusal says so
        return VmRef(rows[0].vm_id, rows[0].vm_name or rows[0].vm_id)
    raise NotFound(f"job {job.name} has no replica of a VM {ref!r} (no restore point names it)")


def point_id(ref: str) -> str:
    """A restore point's id from `jobs/{id}/restorePoints/{id}` or the bare id."""
    return ref.rsplit("/", 1)[-1] if "/restorePoints/" in ref else ref


async def choose_point(db: AsyncSession, job: Job, vm: VmRef, asked: str) -> str:
    """The point to fail over to: the one asked, or the newest. Refused when retention is about to delete it
    (past the job's restore_points_to_keep and held by nothing)."""
    points = list(
        await db.scalars(select(RestorePoint).where(RestorePoint.job_id == job.id, RestorePoint.vm_id == vm.vm_id))
    )
    if not points:
        raise FailedPrecondition(f"VM {vm.vm_name} has no restore point to fail over to")
    wanted = point_id(asked) if asked else max(points, key=lambda p: (p.created_at, p.id)).id
    if wanted not in {p.id for p in points}:
        raise NotFound(f"VM {vm.vm_name} has no restore point {wanted} in job {job.name}")
    held = await held_points(db, job.id, vm.vm_id)
    doomed = points_to_delete([(p.id, p.created_at) for p in points if p.id not in held], job.restore_points_to_keep)
    if wanted in doomed:
        raise FailedPrecondition(
            f"restore point {wanted} of VM {vm.vm_name} is past the job's {job.restore_points_to_keep} points to keep: "
            "retention deletes it at the next session; choose a newer one"
        )
    return wanted


async def check_failover_host(db: AsyncSession, job: Job) -> Host:
    if not job.failover_host_id:
        raise FailedPrecondition(f"job {job.name} has no failover_host: set one (vmrepl job update --failover-host)")
    host = await db.get(Host, job.failover_host_id)
    if host is None or host.provider not in REGISTERING_PROVIDERS:
        raise FailedPrecondition(f"job {job.name}: its failover host cannot register VMs")
    return host


def _overlap(a: str, b: str) -> bool:
    pa, pb = a.casefold().split("/"), b.casefold().split("/")
    n = min(len(pa), len(pb))
    return pa[:n] == pb[:n]


async def check_back_job(db: AsyncSession, job: Job, name: str, vms: int) -> None:
    """A permanent failover's `replicate_back_job`: one VM, a free name, a replica root no other job's overlaps
    (refused before anything happens)."""
    if vms != 1:
        raise InvalidArgument("replicate_back_job", "is for one VM only")
    if await db.scalar(select(Job.id).where(Job.name == name)) is not None:
        raise AlreadyExists(f"jobs/{name} exists already: choose another replicate_back_job")
    root = back_job_root(job, name)
    for other, other_root in (
        await db.execute(select(Job.name, Job.replica_root).where(Job.target_id == job.target_id))
    ).all():
        if _overlap(root, other_root):
            raise FailedPrecondition(f"the new job's replica root {root!r} overlaps {other_root!r} of jobs/{other}")


async def check_not_replicating(db: AsyncSession, job: Job, vm: VmRef) -> None:
    """Refused while a replication session of the job reads the VM (or has yet to plan it)."""
    running = list(
        await db.scalars(
            select(Session).where(
                Session.job_id == job.id, Session.kind == SessionKind.REPLICATION, Session.state.in_(ACTIVE_SESSION)
            )
        )
    )
    for s in running:
        planned = await db.scalar(select(SessionVm.id).where(SessionVm.session_id == s.id).limit(1))
        named = await db.scalar(select(SessionVm.id).where(SessionVm.session_id == s.id, SessionVm.vm_id == vm.vm_id))
        if named is not None or planned is None:
            raise FailedPrecondition(
                f"VM {vm.vm_name} is being replicated now (session {s.id}): wait for it or `vmrepl job stop {job.name}`"
            )


@dataclass(frozen=True, kw_only=True)
class Admission:
    job: Job
    operation: Operation
    plan: Plan
    groups: Sequence[Sequence[str]]
    request: OperationRequest


async def admit(db: AsyncSession, a: Admission) -> Session:
    """Every check, then the session, one row per VM and the VMs claimed, in the caller's transaction."""
    refs = [ref for group in a.groups for ref in group]
    if not refs:
        raise InvalidArgument("groups", "name at least one VM")
    if a.request.point and len(refs) > 1:
        raise InvalidArgument("point", "is for one VM only")
    new_host = ""
    if a.operation is Operation.FAILBACK and a.request.failback_host:
        new_host = await check_new_location(db, a.job, a.request.failback_host, refs)
    elif a.request.failback_host:
        raise InvalidArgument("failback_host", "is for a failback only")
    if a.operation in _NEEDS_HOST:
        await check_failover_host(db, a.job)
    if a.request.replicate_back_job:
        await check_back_job(db, a.job, a.request.replicate_back_job, len(refs))
    session = Session(
        job_id=a.job.id,
        state=SessionState.RUNNING,
        started_at=now(),
        kind=SessionKind.OPERATION,
        operation=a.operation.value,
        request=a.request.json(),
    )
    db.add(session)
    await db.flush()
    seen: set[str] = set()
    for index, group in enumerate(a.groups):
        for ref in group:
            vm = await resolve_vm(db, a.job, ref)
            if vm.vm_id in seen:
                raise InvalidArgument("groups", f"names VM {vm.vm_name} twice")
            seen.add(vm.vm_id)
            row = await _vm_row(db, a, session.id, index, vm)
            if new_host:
                row.data = {**row.data, "new_host_id": new_host}
            db.add(row)
    return session


async def check_new_location(db: AsyncSession, job: Job, ref: str, refs: Sequence[str]) -> str:
    """A failback's new location (`hosts/{id}`, an id or a name): a file host. The committed failback makes
    the new VM the job's VM; on another host than the job's, the job's host changes, so the job must hold
    that VM alone. Its id."""
    bare = ref.removeprefix("hosts/")
    host = await db.scalar(select(Host).where((Host.id == bare) | (Host.name == bare)))
    if host is None:
        raise NotFound(f"failback_host: no host {ref!r}")
    if host.provider not in NEW_LOCATION_PROVIDERS:
        raise FailedPrecondition(
            f"host {host.name} is a {host.provider} host: a failback to a new location is built for file hosts only"
        )
    if host.id != job.host_id:
        count = await db.scalar(select(func.count()).select_from(JobVm).where(JobVm.job_id == job.id))
        if len(refs) > 1 or (count or 0) > 1:
            raise FailedPrecondition(
                f"job {job.name} has other VMs: a VM failed back to host {host.name} (not the job's host) becomes "
                "a VM of that host and needs a job of its own (fail back to the job's host, or move the other "
                "VMs to another job first)"
            )
    return host.id


async def _last_failback(db: AsyncSession, rv: ReplicaVm) -> dict[str, Any]:
    """What a failback to a new location recorded (its new VM, folder, host), for its commit or undo."""
    if not rv.session_id:
        return {}
    last = await db.scalar(
        select(OperationVm).where(OperationVm.session_id == rv.session_id, OperationVm.vm_id == rv.vm_id)
    )
    if last is None or not last.data.get("new_host_id"):
        return {}
    return {k: last.data[k] for k in NEW_KEYS if k in last.data}


async def _vm_row(db: AsyncSession, a: Admission, session_id: str, group: int, vm: VmRef) -> OperationVm:
    rv = await replica_vm(db, a.job.id, vm.vm_id, vm.vm_name)
    check_start(a.plan, rv.state, vm=vm.vm_name, busy_session=rv.busy_session_id)
    if a.operation in (Operation.FAILOVER, Operation.PLANNED_FAILOVER):
        await check_not_replicating(db, a.job, vm)
    data: dict[str, Any] = {
        "from_state": rv.state.value,
        "mount_id": rv.mount_id,
        "running_vm_id": rv.running_vm_id,
        "running_vm_name": rv.running_vm_name,
        "folder": rv.folder,
    }
    point = rv.point_id
    if a.operation in _NEEDS_POINT:
        point = await choose_point(db, a.job, vm, a.request.point)
    if a.operation in (Operation.TEST_FAILOVER, Operation.PERMANENT_FAILOVER):
        await _no_test(db, a.job, vm)  # a second test; or a replica deleted under a test's mount
    if a.operation is Operation.TEST_FAILOVER:  # the test's own mount and VM, not the failed-over VM's
        data.update(test_id=uuid.uuid4().hex, mount_id="", running_vm_id="", running_vm_name="", folder="")
    if a.operation is Operation.STOP_TEST:
        test = await _the_test(db, a.job, vm, a.request.test_id)
        point = test.point_id
        data.update(
            test_id=test.id, mount_id=test.mount_id, running_vm_id=test.test_vm_id, running_vm_name=test.test_vm_name
        )
    if a.operation in (Operation.COMMIT_FAILBACK, Operation.UNDO_FAILBACK):
        data.update(await _last_failback(db, rv))
    rv.busy_session_id = session_id
    if a.plan.running_state is not None:
        rv.state = a.plan.running_state
    return OperationVm(
        session_id=session_id,
        vm_id=vm.vm_id,
        vm_name=vm.vm_name,
        group=group,
        state=OperationStepState.PLANNED,
        point_id=point,
        data=data,
    )


async def _no_test(db: AsyncSession, job: Job, vm: VmRef) -> None:
    test = await db.scalar(select(TestFailover).where(TestFailover.job_id == job.id, TestFailover.vm_id == vm.vm_id))
    if test is not None:
        raise FailedPrecondition(
            f"VM {vm.vm_name} has a test failover running ({test.id}): stop it first "
            f"(`vmrepl replica stop-test {job.name} --vm {vm.vm_name}`)"
        )


async def _the_test(db: AsyncSession, job: Job, vm: VmRef, test_id: str) -> TestFailover:
    q = select(TestFailover).where(TestFailover.job_id == job.id, TestFailover.vm_id == vm.vm_id)
    if test_id:
        q = q.where(TestFailover.id == test_id)
    test = await db.scalar(q)
    if test is None:
        raise FailedPrecondition(f"VM {vm.vm_name} has no test failover {test_id or 'running'}: nothing to stop")
    return test
