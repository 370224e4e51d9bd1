"""ControllerService, replicas: each VM replica of a job as its target reports it, and a rollback on request.

The target is asked live (GetReplica per VM, a few at a time): a target that cannot be asked gives its
error text on each VM's entry, never a failed call, so `restore-points list` can still show what the
controller's database knows. A rollback is refused while a session of the job runs, and no session
starts while it is made (Engine.replica_maintenance).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import grpc
from sqlalchemy import delete, exists, select
from sqlalchemy.ext.asyncio import AsyncSession

from controller.api import resources as res
from controller.api.base import ApiBase
from controller.api.resources.replicas import replica_msg
from controller.db.enums import ReplicaVmState, SessionKind
from controller.db.models import HeldCheckpoint, Job, RestorePoint, Session, SessionVm, Target, Task
from controller.db.models import ReplicaVm as ReplicaVmRow
from controller.engine.agents import TargetClient
from controller.engine.runtime import replica_folder
from vmrepl.domain import unreachable
from vmrepl.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable, VmreplError
from vmrepl.logs import get_logger
from vmrepl.rpc import handle_errors
from vmrepl.v1 import common_pb2
from vmrepl.v1 import controller_pb2 as api

log = get_logger("vmrepl.controller.api.replicas")
# GetReplica calls open at once per ListJobReplicas: a job of many VMs does not flood its target.
REPLICA_CALLS = 8
ASK_SECONDS = 10.0
ROLLBACK_SECONDS = 120.0  # writes the rollback data back: a large session's takes a while


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplicaVm:
    vm_id: str
    vm_name: str
    planned: bool  # a session planned it, so the target may hold a replica (else: none yet)


class ReplicasApi(ApiBase):
    @handle_errors
    async def ListJobReplicas(self, request: api.ListJobReplicasRequest, context: Any) -> api.ListJobReplicasResponse:
        async with self.reads() as db:
            job, target = await self._job_target(db, "parent", request.parent)
            vms = await replica_vms(db, job)
            rows = {p.id: p for p in await db.scalars(select(RestorePoint).where(RestorePoint.job_id == job.id))}
        client = self.engine.parts.agents.target(target.address, target.tls_server_name)
        gate = asyncio.Semaphore(REPLICA_CALLS)

        async def one(vm: ReplicaVm) -> api.JobReplica:
            async with gate:
                return await _ask(client, target.name, job, vm, rows)

        return api.ListJobReplicasResponse(replicas=await asyncio.gather(*(one(vm) for vm in vms)))

    @handle_errors
    async def RollbackJobReplica(self, request: api.RollbackJobReplicaRequest, context: Any) -> api.JobReplica:
        async with self.reads() as db:
            job, target = await self._job_target(db, "job", request.job)
            vm = _pick(await replica_vms(db, job), request.vm, job.name)
        client = self.engine.parts.agents.target(target.address, target.tls_server_name)
        async with self.engine.replica_maintenance(job.id, f"VM {vm.vm_name}'s replica is being rolled back"):
            if not vm.planned:
                raise FailedPrecondition(f"VM {vm.vm_name} of jobs/{job.name} has no replica yet: no session ran it")
            path = f"{job.replica_root}/{replica_folder(vm.vm_id)}"
            try:
                replica = await client.rollback(path, within=ROLLBACK_SECONDS)
            except grpc.aio.AioRpcError as e:
                raise _target_error(target.name, e) from None
            # The progress kept for a resume is gone: the held checkpoint would only lead a session to "continue"
            # a transfer the target no longer has (a disk done in it would send nothing). Released here, the
            # checkpoint is an orphan the next session removes before it takes a new one.
            async with self.journal.change("held checkpoint released", vm=vm.vm_id) as db:
                await db.execute(
                    delete(HeldCheckpoint).where(HeldCheckpoint.job_id == job.id, HeldCheckpoint.vm_id == vm.vm_id)
                )
        log.info("replica_rolled_back", job=job.name, vm_id=vm.vm_id, state=common_pb2.ReplicaState.Name(replica.state))
        async with self.reads() as db:
            rows = {p.id: p for p in await db.scalars(select(RestorePoint).where(RestorePoint.job_id == job.id))}
        try:
            return replica_msg(job.name, vm.vm_id, vm.vm_name, replica, rows)
        except InvalidArgument as e:
            raise FailedPrecondition(f"target {target.name} rolled the replica back but answered: {e}") from None

    async def _job_target(self, db: AsyncSession, field: str, name: str) -> tuple[Job, Target]:
        job = await res.by_name(db, Job, field, name, "jobs")
        target = await db.get(Target, job.target_id)
        if target is None:
            raise NotFound(f"the target of jobs/{job.name} no longer exists")
        return job, target


async def replica_vms(db: AsyncSession, job: Job) -> list[ReplicaVm]:
    """The job's VM replicas, by VM id, each with its newest name: the VMs a replication session of the
    job planned (with disks), those with restore points recorded, and the VMs the job names that no session
    planned yet (no replica: their reference stands in for the id). A failback's transfer (an operation
    session's VM: the failed-over VM, written onto the original) is no replica of the job; nor is a VM failed
    over permanently, whose replica was deleted, unless the job names it again."""
    names: dict[str, str] = {}
    planned = (
        select(SessionVm.vm_id, SessionVm.vm_name)
        .join(Session, Session.id == SessionVm.session_id)
        .where(
            Session.job_id == job.id,
            Session.kind == SessionKind.REPLICATION,
            exists().where(Task.session_id == SessionVm.session_id, Task.vm_id == SessionVm.vm_id),
        )
        .order_by(Session.started_at)
    )
    gone = set(
        await db.scalars(
            select(ReplicaVmRow.vm_id).where(
                ReplicaVmRow.job_id == job.id, ReplicaVmRow.state == ReplicaVmState.PERMANENT
            )
        )
    )
    named = {v.vm_ref for v in job.vms}
    for vm_id, vm_name in (await db.execute(planned)).all():
        if vm_id not in gone or vm_id in named or vm_name in named:
            names[vm_id] = vm_name  # the newest session's name wins
    points = select(RestorePoint.vm_id, RestorePoint.vm_name).where(RestorePoint.job_id == job.id)
    for vm_id, vm_name in (await db.execute(points)).all():
        names.setdefault(vm_id, vm_name or vm_id)
    out = [ReplicaVm(vm_id=i, vm_name=n, planned=True) for i, n in names.items()]
    known = set(names) | set(names.values())
    out += [ReplicaVm(vm_id=v.vm_ref, vm_name=v.vm_ref, planned=False) for v in job.vms if v.vm_ref not in known]
    return sorted(out, key=lambda v: (v.vm_name, v.vm_id))


def _pick(vms: list[ReplicaVm], ref: str, job_name: str) -> ReplicaVm:
    if not ref:
        raise InvalidArgument("vm", "is required: the VM's id or name as the job lists it")
    for vm in vms:
        if ref == vm.vm_id:
            return vm
    by_name = [vm for vm in vms if vm.vm_name == ref]
    if len(by_name) == 1:
        return by_name[0]
    if by_name:
        raise InvalidArgument("vm", f"{ref!r} names {len(by_name)} VMs of jobs/{job_name}: give the VM's id")
    raise NotFound(f"jobs/{job_name} has no VM {ref!r}")


async def _ask(
    client: TargetClient, target_name: str, job: Job, vm: ReplicaVm, rows: dict[str, RestorePoint]
) -> api.JobReplica:
    """One VM's replica from its target; a failure becomes the entry's error text."""
    empty = api.JobReplica(vm_id=vm.vm_id, vm_name=vm.vm_name, state=common_pb2.REPLICA_STATE_EMPTY)
    if not vm.planned:
        return empty
    try:
        replica = await client.get_replica(f"{job.replica_root}/{replica_folder(vm.vm_id)}", within=ASK_SECONDS)
        return replica_msg(job.name, vm.vm_id, vm.vm_name, replica, rows)
    except grpc.aio.AioRpcError as e:
        if e.code() is grpc.StatusCode.NOT_FOUND:  # no session has written it yet
            return empty
        error = str(_target_error(target_name, e))
    except VmreplError as e:  # an id that names no folder, or an answer naming no plain id
        error = f"target {target_name}: {e}"
    return api.JobReplica(vm_id=vm.vm_id, vm_name=vm.vm_name, error=error)


def _target_error(target_name: str, e: grpc.aio.AioRpcError) -> VmreplError:
    what = f"{e.code().name}: {e.details() or ''}".rstrip(": ")
    if unreachable(e.code()):
        return Unavailable(f"target {target_name} cannot be asked now ({what})")
    if e.code() is grpc.StatusCode.NOT_FOUND:
        return NotFound(f"target {target_name}: {what}")
    return FailedPrecondition(f"target {target_name} refused: {what}")
