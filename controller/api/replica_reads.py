"""ControllerService, reading replicas on their targets: a VM's replica verified at a restore point
(VerifyJobReplica) and one disk of a point exported (ExportRestorePoint), each the target's stream relayed.

The job, its VM (id or name; none needed when the job has one VM) and the point (`jobs/{id}/restorePoints/
{id}` or the bare id `restore-points list` shows) are resolved here, and the point must be the job's and
the VM's: a caller names only what the job replicated, never a path on the target.

Both refuse (FAILED_PRECONDITION) while a session of the job runs: it may be writing the very replica, and
a verification of half-written blocks reports mismatches that are not there. A session that starts after
the call began is caught by the target, which fails the call when the disk was prepared meanwhile.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from controller.api import resources as res
from controller.api.base import ApiBase
from controller.db.models import Job, RestorePoint, Session, SessionVm, Target
from controller.engine.agents import TargetClient, relayed
from controller.engine.runtime import replica_folder
from controller.engine.states import ACTIVE_SESSION
from vmrepl.call_limits import Slots
from vmrepl.domain import MAX_REPLICA_READS, MAX_REPLICA_READS_PER_CALLER, check_sample_percent
from vmrepl.errors import FailedPrecondition, InvalidArgument, NotFound
from vmrepl.log_limit import peer_of
from vmrepl.names import check_name
from vmrepl.rpc import handle_errors
from vmrepl.v1 import common_pb2, target_pb2
from vmrepl.v1 import controller_pb2 as api

M = TypeVar("M")
MAX_VM_REF = 256  # as long as a job's VM reference may be


@dataclass(frozen=True, kw_only=True)
class PointOnTarget:
    """Where a restore point of a job's VM lives: the target, the replica's folder there, the point's id."""

    target: TargetClient
    target_name: str
    replica_path: str
    point_id: str
    vm_id: str


def point_ref(field: str, value: str, job: str) -> tuple[str, str]:
    """(job name, point id) from `jobs/{id}/restorePoints/{id}` or a bare id of the job `job` ("" for none)."""
    if not value.startswith("jobs/"):
        return job, check_name(field, value) if value else ""
    parts = value.split("/")
    if len(parts) != 4 or parts[2] != "restorePoints":
        raise InvalidArgument(field, f"{value!r} is not a restore point (jobs/JOB/restorePoints/ID, or the ID)")
    named = f"jobs/{parts[1]}"
    if job and job != named:
        raise InvalidArgument(field, f"{value!r} is not a restore point of {job}")
    return named, check_name(field, parts[3])


async def _relay(stream: AsyncGenerator[M, None], target: str) -> AsyncGenerator[M, None]:
    """The target's stream, its errors as the controller's (named after the target); closed when the
    caller goes away, which cancels the target's call."""
    try:
        async for item in stream:
            yield item
    except grpc.aio.AioRpcError as e:
        raise relayed(e, f"target {target}") from e
    finally:
        await stream.aclose()


@contextlib.contextmanager
def _read_slot(slots: Slots, context: Any) -> Iterator[None]:
    """One of the caller's replica-read slots for the call's length (RESOURCE_EXHAUSTED past a bound): one
    operator's flood of verifications cannot take every read slot of the targets."""
    peer = peer_of(context)
    slots.take(peer)
    try:
        yield
    finally:
        slots.give(peer)


class ReplicaReadsApi(ApiBase):
    _read_slots: Slots | None = None

    def _slots(self) -> Slots:
        if self._read_slots is None:
            self._read_slots = Slots(
                per_peer=MAX_REPLICA_READS_PER_CALLER, total=MAX_REPLICA_READS, what="replica reads (verify, export)"
            )
        return self._read_slots

    @handle_errors
    async def VerifyJobReplica(
        self, request: api.VerifyJobReplicaRequest, context: Any
    ) -> AsyncGenerator[common_pb2.VerifyProgress, None]:
        # Closed here, not by the garbage collector, when the caller goes away: the target's call ends at once.
        with _read_slot(self._slots(), context):
            async with contextlib.aclosing(self._verify(request)) as verify:
                async for progress in verify:
                    yield progress

    async def _verify(self, request: api.VerifyJobReplicaRequest) -> AsyncGenerator[common_pb2.VerifyProgress, None]:
        check_sample_percent("sample_percent", request.sample_percent)
        job, point_id = point_ref("restore_point", request.restore_point, request.job)
        at = await self._point_on_target(job, request.vm, point_id)
        verify = target_pb2.VerifyReplicaRequest(
            replica_path=at.replica_path, restore_point_id=at.point_id, sample_percent=request.sample_percent
        )
        # Closed here when the caller goes away, not by the garbage collector: the target's call ends at once.
        async with contextlib.aclosing(_relay(at.target.verify(verify), at.target_name)) as relay:
            async for progress in relay:
                yield progress

    @handle_errors
    async def ExportRestorePoint(
        self, request: api.ExportRestorePointRequest, context: Any
    ) -> AsyncGenerator[common_pb2.DiskChunk, None]:
        with _read_slot(self._slots(), context):
            async with contextlib.aclosing(self._export(request)) as export:
                async for chunk in export:
                    yield chunk

    async def _export(self, request: api.ExportRestorePointRequest) -> AsyncGenerator[common_pb2.DiskChunk, None]:
        if not request.restore_point:
            raise InvalidArgument("restore_point", "is required (jobs/JOB/restorePoints/ID, or the ID with job)")
        check_name("disk", request.disk)
        job, point_id = point_ref("restore_point", request.restore_point, request.job)
        at = await self._point_on_target(job, request.vm, point_id)
        read = target_pb2.ReadReplicaDiskRequest(
            replica_path=at.replica_path, restore_point_id=at.point_id, disk_id=request.disk
        )
        async with contextlib.aclosing(_relay(at.target.read_disk(read), at.target_name)) as relay:
            async for chunk in relay:
                yield chunk

    async def _point_on_target(self, job_name: str, vm: str, point_id: str) -> PointOnTarget:
        async with self.reads() as db:
            job = await res.by_name(db, Job, "job", job_name, "jobs")
            running = await db.scalar(
                select(Session.id).where(Session.job_id == job.id, Session.state.in_(ACTIVE_SESSION))
            )
            if running is not None:
                raise FailedPrecondition(
                    f"sessions/{running} of {job_name} is running and may be writing the replica; try again when "
                    "it has ended"
                )
            vm_id = await _vm_id(db, job, vm) if vm or not point_id else ""
            point = await _point(db, job, vm_id, point_id, vm)
            target = await db.get(Target, job.target_id)
            if target is None:
                raise NotFound(f"the target of {job_name} does not exist")
            return PointOnTarget(
                target=self.engine.parts.agents.target(target.address, target.tls_server_name),
                target_name=target.name,
                replica_path=f"{job.replica_root}/{replica_folder(point.vm_id)}",
                point_id=point.id,
                vm_id=point.vm_id,
            )


async def _vm_id(db: AsyncSession, job: Job, ref: str) -> str:
    """The id of the job's VM `ref` (its id or name as the job's sessions recorded them; "" the job's only VM)."""
    if not ref:
        if len(job.vms) != 1:
            raise InvalidArgument("vm", f"jobs/{job.name} has {len(job.vms)} VMs: name one (its id or name)")
        ref = job.vms[0].vm_ref
    elif len(ref) > MAX_VM_REF:
        raise InvalidArgument("vm", f"is longer than {MAX_VM_REF} characters")
    res.check_printable("vm", ref)
    q = (
        select(SessionVm.vm_id, SessionVm.vm_name)
        .join(Session, Session.id == SessionVm.session_id)
        .where(Session.job_id == job.id)
        .distinct()
    )
    known = (await db.execute(q)).all()
    if any(vm_id == ref for vm_id, _ in known):
        return ref
    named = {vm_id for vm_id, name in known if name == ref}
    if len(named) > 1:
        raise InvalidArgument("vm", f"{ref!r} names {len(named)} VMs of jobs/{job.name}: give the VM's id")
    if not named:
        raise NotFound(f"VM {ref!r} has no replica in jobs/{job.name}")
    return named.pop()


async def _point(db: AsyncSession, job: Job, vm_id: str, point_id: str, vm_ref: str) -> RestorePoint:
    """Restore point `point_id` of the job (of its VM `vm_id` when given), or the VM's newest with ""."""
    if not point_id:
        q = (
            select(RestorePoint)
            .where(RestorePoint.job_id == job.id, RestorePoint.vm_id == vm_id)
            .order_by(RestorePoint.created_at.desc(), RestorePoint.id.desc())
            .limit(1)
        )
        newest = await db.scalar(q)
        if newest is None:
            raise NotFound(f"VM {vm_id} of jobs/{job.name} has no restore point")
        return newest
    point = await db.get(RestorePoint, point_id)
    if point is None or point.job_id != job.id:  # another job's point is no more visible than a missing one
        raise NotFound(f"jobs/{job.name}/restorePoints/{point_id} does not exist")
    if vm_id and point.vm_id != vm_id:
        raise InvalidArgument("vm", f"restore point {point_id} is of VM {point.vm_id}, not of {vm_ref}")
    return point
