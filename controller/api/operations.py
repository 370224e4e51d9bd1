"""ControllerService, replica operations: start one (role operator), and where each VM of a job stands (role
reader). The operation runs as a session of kind OPERATION (WatchSession, GetSessionLog); docs/failover.md."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from controller.api import resources as res
from controller.api.base import ApiBase
from controller.db.enums import ReplicaVmState
from controller.db.models import Host, Job, ReplicaVm, RestorePoint, TestFailover
from controller.engine.operations.admission import resolve_vm
from controller.engine.operations.context import OperationRequest
from controller.engine.operations.plans import Operation
from vmrepl.errors import InvalidArgument
from vmrepl.rpc import handle_errors
from vmrepl.v1 import controller_pb2 as api

REPLICA_STATES: dict[ReplicaVmState, api.ReplicaVmState.ValueType] = {
    s: api.ReplicaVmState.Value(f"REPLICA_VM_STATE_{s.name}") for s in ReplicaVmState
}
MAX_VMS = 256
MAX_REF = 256
MAX_TEST_SECONDS = 30 * 24 * 3600


def _groups(request: api.StartReplicaOperationRequest) -> list[list[str]]:
    groups = [list(g.vms) for g in request.groups]
    refs = [v for g in groups for v in g]
    if not refs:
        raise InvalidArgument("groups", "name at least one VM")
    if len(refs) > MAX_VMS:
        raise InvalidArgument("groups", f"names more than {MAX_VMS} VMs")
    for i, g in enumerate(groups):
        if not g:
            raise InvalidArgument(f"groups[{i}].vms", "is empty")
        for j, v in enumerate(g):
            if not 1 <= len(v) <= MAX_REF:
                raise InvalidArgument(f"groups[{i}].vms[{j}]", "must be a VM id or name of 1 to 256 characters")
            res.check_printable(f"groups[{i}].vms[{j}]", v)
    return groups


def _request(request: api.StartReplicaOperationRequest) -> OperationRequest:
    for field in ("point", "test_id", "replicate_back_job", "failback_host"):
        value = getattr(request, field)
        if len(value) > 256:
            raise InvalidArgument(field, "is longer than 256 characters")
        res.check_printable(field, value)
    if request.time_limit_seconds > MAX_TEST_SECONDS:
        raise InvalidArgument("time_limit_seconds", f"must be at most {MAX_TEST_SECONDS} (30 days)")
    if request.replicate_back_job:
        if request.operation != api.REPLICA_OPERATION_PERMANENT_FAILOVER:
            raise InvalidArgument("replicate_back_job", "is for a permanent failover only")
        res.check_id("replicate_back_job", request.replicate_back_job)
    return OperationRequest(
        point=request.point,
        time_limit_seconds=request.time_limit_seconds,
        test_id=request.test_id,
        replicate_back_job=request.replicate_back_job,
        failback_host=request.failback_host,
    )


def _job_ref(value: str) -> str:
    """`jobs/NAME` or the bare name, as the request's comment allows."""
    return value if value.startswith("jobs/") or not value else f"jobs/{value}"


class OperationsApi(ApiBase):
    @handle_errors
    async def StartReplicaOperation(self, request: api.StartReplicaOperationRequest, context: Any) -> api.Session:
        try:
            operation = Operation.from_proto(request.operation)
        except ValueError as e:
            raise InvalidArgument("operation", "is required: one of the REPLICA_OPERATION_ values") from e
        groups, settings = _groups(request), _request(request)
        job_id = await self._job_id("job", _job_ref(request.job))
        session = await self.engine.operations.start(job_id, operation, groups, settings)
        return await self._session(session.id)

    @handle_errors
    async def GetReplicaVm(self, request: api.GetReplicaVmRequest, context: Any) -> api.ReplicaVm:
        async with self.reads() as db:
            job = await res.by_name(db, Job, "job", _job_ref(request.job), "jobs")
            if len(request.vm) > MAX_REF:  # as a group's VM; a longer one went whole into the NOT_FOUND and the log
                raise InvalidArgument("vm", f"must be a VM id or name of at most {MAX_REF} characters")
            ref = request.vm or await _only_vm(db, job)
            res.check_printable("vm", ref)
            vm = await resolve_vm(db, job, ref)
            return await _replica_vm_msg(db, job, vm.vm_id, vm.vm_name)

    @handle_errors
    async def ListReplicaVms(self, request: api.ListReplicaVmsRequest, context: Any) -> api.ListReplicaVmsResponse:
        async with self.reads() as db:
            job = await res.by_name(db, Job, "parent", request.parent, "jobs")
            known: dict[str, str] = {}
            for vm_id, name in (
                await db.execute(select(RestorePoint.vm_id, RestorePoint.vm_name).where(RestorePoint.job_id == job.id))
            ).all():
                known[vm_id] = name or vm_id
            for rv in await db.scalars(select(ReplicaVm).where(ReplicaVm.job_id == job.id)):
                known[rv.vm_id] = rv.vm_name or known.get(rv.vm_id, rv.vm_id)
            vms = [
                await _replica_vm_msg(db, job, vm_id, known[vm_id]) for vm_id in sorted(known, key=known.__getitem__)
            ]
        return api.ListReplicaVmsResponse(vms=vms)


async def _only_vm(db: AsyncSession, job: Job) -> str:
    if len(job.vms) == 1:
        return job.vms[0].vm_ref
    raise InvalidArgument("vm", f"is required: job {job.name} has {len(job.vms)} VMs")


async def _replica_vm_msg(db: AsyncSession, job: Job, vm_id: str, vm_name: str) -> api.ReplicaVm:
    rv = await db.scalar(select(ReplicaVm).where(ReplicaVm.job_id == job.id, ReplicaVm.vm_id == vm_id))
    hosts = {h.id: h.name for h in await db.scalars(select(Host))}
    msg = api.ReplicaVm(job=f"jobs/{job.name}", vm_id=vm_id, vm_name=vm_name, state=api.REPLICA_VM_STATE_REPLICATING)
    if rv is not None:
        msg.state = REPLICA_STATES[rv.state]
        msg.restore_point = f"jobs/{job.name}/restorePoints/{rv.point_id}" if rv.point_id else ""
        msg.host = f"hosts/{hosts[rv.host_id]}" if rv.host_id in hosts else ""
        msg.running_vm_id, msg.running_vm_name, msg.folder = rv.running_vm_id, rv.running_vm_name, rv.folder
        msg.session = f"sessions/{rv.busy_session_id or rv.session_id}" if (rv.busy_session_id or rv.session_id) else ""
        since = res.timestamp(rv.since)
        if since is not None:
            msg.state_time.CopyFrom(since)
    tests = await db.scalars(select(TestFailover).where(TestFailover.job_id == job.id, TestFailover.vm_id == vm_id))
    for t in tests:
        msg.tests.append(
            api.TestFailover(
                test_id=t.id,
                restore_point=f"jobs/{job.name}/restorePoints/{t.point_id}",
                host=f"hosts/{hosts[t.host_id]}" if t.host_id in hosts else "",
                vm_id=t.test_vm_id,
                vm_name=t.test_vm_name,
                start_time=res.timestamp(t.started_at),
                deadline=res.timestamp(t.deadline),
                session=f"sessions/{t.session_id}",
            )
        )
    return msg
