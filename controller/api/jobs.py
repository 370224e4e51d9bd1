"""ControllerService, jobs: create, read, change and delete them; start and stop their sessions."""

from __future__ import annotations

from typing import Any

from google.protobuf import empty_pb2
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from controller.api import resources as res
from controller.api.base import BY_NAME, ApiBase
from controller.db.enums import ReplicaVmState
from controller.db.models import (
    Host,
    Job,
    ReplicaVm,
    Session,
    TestFailover,
)
from controller.engine.states import ACTIVE_SESSION
from vmrepl.errors import InvalidArgument, NotFound
from vmrepl.rpc import handle_errors
from vmrepl.v1 import controller_pb2 as api

# The VM states that leave nothing of a job's replica in use: a job may be deleted.
_AT_REST = (ReplicaVmState.REPLICATING, ReplicaVmState.PERMANENT)


class JobsApi(ApiBase):
    @handle_errors
    async def CreateJob(self, request: api.CreateJobRequest, context: Any) -> api.Job:
        async def fill(db: AsyncSession, row: Job) -> None:
            await res.apply_job(db, request.job, row, res.JOB_FIELDS, secrets=self.secrets)

        await self._check_vms(request.job.host, [(v.vm, list(v.excluded_disks)) for v in request.job.vms])

        row = await self._create(Job, "job_id", request.job_id, "jobs", fill)
        async with self.reads() as db:
            job = await db.get(Job, row.id)
            if job is None:
                raise NotFound(f"jobs/{request.job_id} was deleted meanwhile")
            return await res.job_msg(db, job)

    @handle_errors
    async def GetJob(self, request: api.GetJobRequest, context: Any) -> api.Job:
        async with self.reads() as db:
            return await res.job_msg(db, await res.by_name(db, Job, "name", request.name, "jobs"))

    @handle_errors
    async def ListJobs(self, request: api.ListJobsRequest, context: Any) -> api.ListJobsResponse:
        async def convert(db: AsyncSession, rows: list[Job]) -> list[api.Job]:
            return [await res.job_msg(db, r) for r in rows]

        out, token = await self._list(request, BY_NAME[Job], convert)
        return api.ListJobsResponse(jobs=out, next_page_token=token)

    @handle_errors
    async def UpdateJob(self, request: api.UpdateJobRequest, context: Any) -> api.Job:
        paths = res.mask_paths("update_mask", request.update_mask.paths, res.JOB_FIELDS)
        if "vms" in paths or "host" in paths:
            async with self.reads() as db:
                row = await res.by_name(db, Job, "job.name", request.job.name, "jobs")
                host = await db.get(Host, row.host_id)
            vms = [(v.vm, list(v.excluded_disks)) for v in request.job.vms]
            if "vms" not in paths:
                vms = [(jv.vm_ref, [str(d) for d in jv.excluded_disks]) for jv in row.vms]
            await self._check_vms(request.job.host if "host" in paths else f"hosts/{host.name if host else ''}", vms)
        async with self.journal.write() as db:
            row = await res.by_name(db, Job, "job.name", request.job.name, "jobs")
            await res.apply_job(db, request.job, row, paths, secrets=self.secrets)
        async with self.reads() as db:
            job = await db.get(Job, row.id)
            if job is None:
                raise NotFound(f"{request.job.name} was deleted meanwhile")
            return await res.job_msg(db, job)

    async def _check_vms(self, host_name: str, vms: list[tuple[str, list[str]]]) -> None:
        """A job names VMs its Hyper-V host has, and disks those VMs have: refused when made, not at the
        session. A file host is a folder the lab fills, often after the job is made (its tests make VM folders
        a job already names, shared ids included): its VMs are checked at the session."""
        async with self.reads() as db:
            host = await res.by_name(db, Host, "job.host", host_name, "hosts")
            if host.provider == "file":
                return
            provider = await self.providers.for_host(db, host)
        for i, (ref, excluded) in enumerate(vms):
            try:
                vm = await provider.get_vm(ref)
            except NotFound:
                raise InvalidArgument(
                    f"job.vms[{i}].vm",
                    f"host {host.name} has no VM {ref!r} (`vmrepl infra vms {host.name}` lists them)",
                ) from None
            disks = {d.disk_id for d in vm.disks}
            for d in excluded:
                if d not in disks:
                    raise InvalidArgument(
                        f"job.vms[{i}].excluded_disks",
                        f"VM {ref!r} has no disk {d!r} (it has {', '.join(sorted(disks))})",
                    )

    @handle_errors
    async def DeleteJob(self, request: api.DeleteJobRequest, context: Any) -> empty_pb2.Empty:
        async def users(db: AsyncSession, row: Job) -> list[str]:
            q = select(Session.id).where(Session.job_id == row.id, Session.state.in_(ACTIVE_SESSION))
            running = [f"sessions/{s} (running)" for s in await db.scalars(q)]
            # A VM running from the job's replica (failed over, failed back, under test) would lose its records.
            moved = select(ReplicaVm.vm_name, ReplicaVm.state).where(
                ReplicaVm.job_id == row.id, ReplicaVm.state.not_in(_AT_REST)
            )
            vms = [
                f"VM {n} ({st.value.replace('_', ' ')}; undo or commit it first)" for n, st in await db.execute(moved)
            ]
            tests = select(TestFailover.vm_id).where(TestFailover.job_id == row.id)
            vms += [f"a test failover of VM {v} (stop-test it first)" for v in await db.scalars(tests)]
            return running + vms

        await self._delete(Job, "name", request.name, "jobs", in_use=users)
        return empty_pb2.Empty()

    @handle_errors
    async def StartJob(self, request: api.StartJobRequest, context: Any) -> api.Session:
        session = await self.engine.start_job(await self._job_id("name", request.name), full_check=request.full_check)
        return await self._session(session.id)

    @handle_errors
    async def StopJob(self, request: api.StopJobRequest, context: Any) -> api.Session:
        session = await self.engine.stop_job(await self._job_id("name", request.name))
        return await self._session(session.id)
