"""ControllerService: the gRPC API over the configuration database and the session engine.

Roles come from the caller's certificate: `operator` may call everything,
`reader` only the Get, List and Watch methods. Credentials' secrets are
accepted, sealed and stored; no reply or log line carries one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from google.protobuf import empty_pb2
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from controller import resources as res
from controller.db.models import (
    Credential,
    Host,
    Job,
    Proxy,
    RestorePoint,
    Session,
    SessionVm,
    Target,
    Task,
)
from controller.db.secrets import SecretBox
from controller.engine import ACTIVE, Engine
from controller.journal import Journal
from controller.providers import check_host
from controller.runtime import LiveProgress
from controller.session_log import read_session_log
from controller.sessions_view import log_entry, session_msg
from protos.vmrepl.v1 import controller_pb2 as api
from protos.vmrepl.v1 import controller_pb2_grpc
from vmrepl.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from vmrepl.rpc import handle_errors
from vmrepl.security.tls import require_role

READ = ("operator", "reader")
WRITE = ("operator",)
WATCH_INTERVAL = 0.5
M = TypeVar("M")


class ControllerServicer(controller_pb2_grpc.ControllerServiceServicer):
    def __init__(
        self, *, journal: Journal, engine: Engine, secrets: SecretBox, live: LiveProgress, session_logs: Path
    ) -> None:
        self.session_logs = session_logs
        self.journal = journal
        self.engine = engine
        self.secrets = secrets
        self.live = live

    # ---- shared shapes ------------------------------------------------------------------------------

    async def _create(
        self,
        model: type[M],
        rid_field: str,
        rid: str,
        collection: str,
        fill: Callable[[AsyncSession, M], Awaitable[None]],
    ) -> M:
        res.check_id(rid_field, rid)
        async with self.journal.write() as db:
            taken = await db.scalar(select(model).where(model.name == rid))  # type: ignore[attr-defined,arg-type]
            if taken is not None:
                raise AlreadyExists(f"{collection}/{rid} already exists")
            row = model(name=rid)  # type: ignore[call-arg]
            await fill(db, row)
            db.add(row)
        return row

    async def _list(self, model: type[M], size: int, token: str, order: Any, where: Any = None) -> tuple[list[M], str]:
        limit, offset = res.page_bounds(size, token)
        q = select(model)
        if where is not None:
            q = q.where(where)
        async with self.journal.read() as db:
            rows = list(await db.scalars(q.order_by(*order).offset(offset).limit(limit + 1)))
        return rows[:limit], res.next_token(limit, offset, len(rows))

    async def _delete(self, model: type[M], field: str, name: str, collection: str, *, in_use: Any = None) -> None:
        async with self.journal.write() as db:
            row = await res.by_name(db, model, field, name, collection)
            if in_use is not None:
                users = await in_use(db, row)
                if users:
                    raise FailedPrecondition(f"{name} is used by {', '.join(users)}")
            await db.delete(row)

    # ---- credentials ----------------------------------------------------------------------------------

    @handle_errors
    async def CreateCredential(self, request: api.CreateCredentialRequest, context: Any) -> Any:
        require_role(context, *WRITE)
        res.check_id("credential_id", request.credential_id)
        res.check_username("credential.username", request.credential.username)
        res.check_secret("secret", request.secret)

        async def fill(_db: AsyncSession, row: Credential) -> None:
            row.username, row.secret = request.credential.username, self.secrets.seal(request.secret)

        return res.credential_msg(
            await self._create(Credential, "credential_id", request.credential_id, "credentials", fill)
        )

    @handle_errors
    async def GetCredential(self, request: api.GetCredentialRequest, context: Any) -> Any:
        require_role(context, *READ)
        async with self.journal.read() as db:
            return res.credential_msg(await res.by_name(db, Credential, "name", request.name, "credentials"))

    @handle_errors
    async def ListCredentials(self, request: api.ListCredentialsRequest, context: Any) -> Any:
        require_role(context, *READ)
        rows, token = await self._list(Credential, request.page_size, request.page_token, [Credential.name])
        return api.ListCredentialsResponse(credentials=[res.credential_msg(r) for r in rows], next_page_token=token)

    @handle_errors
    async def UpdateCredential(self, request: api.UpdateCredentialRequest, context: Any) -> Any:
        require_role(context, *WRITE)
        paths = res.mask_paths("update_mask", request.update_mask.paths, ("username", "secret"))
        async with self.journal.write() as db:
            row = await res.by_name(db, Credential, "credential.name", request.credential.name, "credentials")
            if "username" in paths:
                row.username = res.check_username("credential.username", request.credential.username)
            if "secret" in paths:
                row.secret = self.secrets.seal(res.check_secret("secret", request.secret))
        return res.credential_msg(row)

    @handle_errors
    async def DeleteCredential(self, request: api.DeleteCredentialRequest, context: Any) -> Any:
        require_role(context, *WRITE)

        async def users(db: AsyncSession, row: Credential) -> list[str]:
            return [f"hosts/{h}" for h in await db.scalars(select(Host.name).where(Host.credential_id == row.id))]

        await self._delete(Credential, "name", request.name, "credentials", in_use=users)
        return empty_pb2.Empty()

    # ---- hosts ----------------------------------------------------------------------------------------

    @handle_errors
    async def CreateHost(self, request: api.CreateHostRequest, context: Any) -> Any:
        require_role(context, *WRITE)

        async def fill(db: AsyncSession, row: Host) -> None:
            await res.apply_host(db, request.host, row, res.HOST_FIELDS)
            await check_host(row)

        row = await self._create(Host, "host_id", request.host_id, "hosts", fill)
        async with self.journal.read() as db:
            return await res.host_msg(db, row)

    @handle_errors
    async def GetHost(self, request: api.GetHostRequest, context: Any) -> Any:
        require_role(context, *READ)
        async with self.journal.read() as db:
            return await res.host_msg(db, await res.by_name(db, Host, "name", request.name, "hosts"))

    @handle_errors
    async def ListHosts(self, request: api.ListHostsRequest, context: Any) -> Any:
        require_role(context, *READ)
        rows, token = await self._list(Host, request.page_size, request.page_token, [Host.name])
        async with self.journal.read() as db:
            return api.ListHostsResponse(hosts=[await res.host_msg(db, r) for r in rows], next_page_token=token)

    @handle_errors
    async def UpdateHost(self, request: api.UpdateHostRequest, context: Any) -> Any:
        require_role(context, *WRITE)
        paths = res.mask_paths("update_mask", request.update_mask.paths, res.HOST_FIELDS)
        async with self.journal.write() as db:
            row = await res.by_name(db, Host, "host.name", request.host.name, "hosts")
            await res.apply_host(db, request.host, row, paths)
            await check_host(row)
        async with self.journal.read() as db:
            return await res.host_msg(db, row)

    @handle_errors
    async def DeleteHost(self, request: api.DeleteHostRequest, context: Any) -> Any:
        require_role(context, *WRITE)

        async def users(db: AsyncSession, row: Host) -> list[str]:
            return [f"jobs/{j}" for j in await db.scalars(select(Job.name).where(Job.host_id == row.id))]

        await self._delete(Host, "name", request.name, "hosts", in_use=users)
        return empty_pb2.Empty()

    # ---- proxies --------------------------------------------------------------------------------------

    @handle_errors
    async def CreateProxy(self, request: api.CreateProxyRequest, context: Any) -> Any:
        require_role(context, *WRITE)

        async def fill(db: AsyncSession, row: Proxy) -> None:
            await res.apply_agent(db, "proxy", request.proxy, row, res.PROXY_FIELDS)

        row = await self._create(Proxy, "proxy_id", request.proxy_id, "proxies", fill)
        async with self.journal.read() as db:
            return await res.proxy_msg(db, row)

    @handle_errors
    async def GetProxy(self, request: api.GetProxyRequest, context: Any) -> Any:
        require_role(context, *READ)
        async with self.journal.read() as db:
            return await res.proxy_msg(db, await res.by_name(db, Proxy, "name", request.name, "proxies"))

    @handle_errors
    async def ListProxies(self, request: api.ListProxiesRequest, context: Any) -> Any:
        require_role(context, *READ)
        rows, token = await self._list(Proxy, request.page_size, request.page_token, [Proxy.name])
        async with self.journal.read() as db:
            return api.ListProxiesResponse(proxies=[await res.proxy_msg(db, r) for r in rows], next_page_token=token)

    @handle_errors
    async def UpdateProxy(self, request: api.UpdateProxyRequest, context: Any) -> Any:
        require_role(context, *WRITE)
        paths = res.mask_paths("update_mask", request.update_mask.paths, res.PROXY_FIELDS)
        async with self.journal.write() as db:
            row = await res.by_name(db, Proxy, "proxy.name", request.proxy.name, "proxies")
            await res.apply_agent(db, "proxy", request.proxy, row, paths)
        async with self.journal.read() as db:
            return await res.proxy_msg(db, row)

    @handle_errors
    async def DeleteProxy(self, request: api.DeleteProxyRequest, context: Any) -> Any:
        require_role(context, *WRITE)
        await self._delete(Proxy, "name", request.name, "proxies")
        return empty_pb2.Empty()

    # ---- targets --------------------------------------------------------------------------------------

    @handle_errors
    async def CreateTarget(self, request: api.CreateTargetRequest, context: Any) -> Any:
        require_role(context, *WRITE)

        async def fill(db: AsyncSession, row: Target) -> None:
            await res.apply_agent(db, "target", request.target, row, res.TARGET_FIELDS)

        return res.target_msg(await self._create(Target, "target_id", request.target_id, "targets", fill))

    @handle_errors
    async def GetTarget(self, request: api.GetTargetRequest, context: Any) -> Any:
        require_role(context, *READ)
        async with self.journal.read() as db:
            return res.target_msg(await res.by_name(db, Target, "name", request.name, "targets"))

    @handle_errors
    async def ListTargets(self, request: api.ListTargetsRequest, context: Any) -> Any:
        require_role(context, *READ)
        rows, token = await self._list(Target, request.page_size, request.page_token, [Target.name])
        return api.ListTargetsResponse(targets=[res.target_msg(r) for r in rows], next_page_token=token)

    @handle_errors
    async def UpdateTarget(self, request: api.UpdateTargetRequest, context: Any) -> Any:
        require_role(context, *WRITE)
        paths = res.mask_paths("update_mask", request.update_mask.paths, res.TARGET_FIELDS)
        async with self.journal.write() as db:
            row = await res.by_name(db, Target, "target.name", request.target.name, "targets")
            await res.apply_agent(db, "target", request.target, row, paths)
        return res.target_msg(row)

    @handle_errors
    async def DeleteTarget(self, request: api.DeleteTargetRequest, context: Any) -> Any:
        require_role(context, *WRITE)

        async def users(db: AsyncSession, row: Target) -> list[str]:
            return [f"jobs/{j}" for j in await db.scalars(select(Job.name).where(Job.target_id == row.id))]

        await self._delete(Target, "name", request.name, "targets", in_use=users)
        return empty_pb2.Empty()

    # ---- jobs -----------------------------------------------------------------------------------------

    @handle_errors
    async def CreateJob(self, request: api.CreateJobRequest, context: Any) -> Any:
        require_role(context, *WRITE)

        async def fill(db: AsyncSession, row: Job) -> None:
            await res.apply_job(db, request.job, row, res.JOB_FIELDS)

        row = await self._create(Job, "job_id", request.job_id, "jobs", fill)
        async with self.journal.read() as db:
            job = await db.get(Job, row.id)
            if job is None:
                raise NotFound(f"jobs/{request.job_id} was deleted meanwhile")
            return await res.job_msg(db, job)

    @handle_errors
    async def GetJob(self, request: api.GetJobRequest, context: Any) -> Any:
        require_role(context, *READ)
        async with self.journal.read() as db:
            return await res.job_msg(db, await res.by_name(db, Job, "name", request.name, "jobs"))

    @handle_errors
    async def ListJobs(self, request: api.ListJobsRequest, context: Any) -> Any:
        require_role(context, *READ)
        rows, token = await self._list(Job, request.page_size, request.page_token, [Job.name])
        async with self.journal.read() as db:
            return api.ListJobsResponse(jobs=[await res.job_msg(db, r) for r in rows], next_page_token=token)

    @handle_errors
    async def UpdateJob(self, request: api.UpdateJobRequest, context: Any) -> Any:
        require_role(context, *WRITE)
        paths = res.mask_paths("update_mask", request.update_mask.paths, res.JOB_FIELDS)
        async with self.journal.write() as db:
            row = await res.by_name(db, Job, "job.name", request.job.name, "jobs")
            await res.apply_job(db, request.job, row, paths)
        async with self.journal.read() as db:
            job = await db.get(Job, row.id)
            if job is None:
                raise NotFound(f"{request.job.name} was deleted meanwhile")
            return await res.job_msg(db, job)

    @handle_errors
    async def DeleteJob(self, request: api.DeleteJobRequest, context: Any) -> Any:
        require_role(context, *WRITE)

        async def users(db: AsyncSession, row: Job) -> list[str]:
            q = select(Session.id).where(Session.job_id == row.id, Session.state.in_(ACTIVE))
            return [f"sessions/{s} (running)" for s in await db.scalars(q)]

        await self._delete(Job, "name", request.name, "jobs", in_use=users)
        return empty_pb2.Empty()

    # ---- sessions -------------------------------------------------------------------------------------

    async def _job_id(self, field: str, name: str) -> str:
        async with self.journal.read() as db:
            return (await res.by_name(db, Job, field, name, "jobs")).id

    @handle_errors
    async def StartJob(self, request: api.StartJobRequest, context: Any) -> Any:
        require_role(context, *WRITE)
        session = await self.engine.start_job(await self._job_id("name", request.name))
        return await self._session(session.id)

    @handle_errors
    async def StopJob(self, request: api.StopJobRequest, context: Any) -> Any:
        require_role(context, *WRITE)
        session = await self.engine.stop_job(await self._job_id("name", request.name))
        return await self._session(session.id)

    async def session(self, session_id: str) -> api.Session:
        """A session as the API shows it (the webhook's body uses it too)."""
        return await self._session(session_id)

    async def _session(self, session_id: str) -> api.Session:
        async with self.journal.read() as db:
            row = await db.get(Session, session_id)
            if row is None:
                raise NotFound(f"sessions/{session_id} does not exist")
            return await self._session_msg(db, row)

    async def _session_msg(self, db: AsyncSession, row: Session) -> api.Session:
        job = await db.get(Job, row.job_id)
        vms = list(
            await db.scalars(select(SessionVm).where(SessionVm.session_id == row.id).order_by(SessionVm.vm_name))
        )
        tasks = list(await db.scalars(select(Task).where(Task.session_id == row.id).order_by(Task.disk_id)))
        proxies = {p.id: p.name for p in await db.scalars(select(Proxy))}
        return session_msg(row, job.name if job else "", vms, tasks, proxies=proxies, live=self.live.get(row.id))

    def _session_id(self, field: str, name: str) -> str:
        prefix = "sessions/"
        if not name.startswith(prefix) or not name[len(prefix) :].isalnum():
            raise InvalidArgument(field, f"{name!r} is not a session name (sessions/ID)")
        return name[len(prefix) :]

    @handle_errors
    async def GetSession(self, request: api.GetSessionRequest, context: Any) -> Any:
        require_role(context, *READ)
        return await self._session(self._session_id("name", request.name))

    @handle_errors
    async def ListSessions(self, request: api.ListSessionsRequest, context: Any) -> Any:
        require_role(context, *READ)
        where = Session.job_id == await self._job_id("job", request.job) if request.job else None
        order = [Session.started_at.desc(), Session.id]
        rows, token = await self._list(Session, request.page_size, request.page_token, order, where)
        async with self.journal.read() as db:
            out = [await self._session_msg(db, r) for r in rows]
        return api.ListSessionsResponse(sessions=out, next_page_token=token)

    @handle_errors
    async def WatchSession(self, request: api.WatchSessionRequest, context: Any) -> AsyncIterator[api.Session]:
        require_role(context, *READ)
        session_id = self._session_id("name", request.name)
        last = b""
        while True:
            msg = await self._session(session_id)
            key = msg.SerializeToString(deterministic=True)
            if key != last:
                yield msg
                last = key
            if msg.state not in (api.SESSION_STATE_RUNNING, api.SESSION_STATE_STOPPING):
                return
            await self.live.wait(session_id, WATCH_INTERVAL * 4)
            await asyncio.sleep(WATCH_INTERVAL)  # at most two updates a second

    @handle_errors
    async def GetSessionLog(self, request: api.GetSessionLogRequest, context: Any) -> Any:
        require_role(context, *READ)
        session_id = self._session_id("name", request.name)
        await self._session(session_id)  # NOT_FOUND for an unknown session
        limit, offset = res.page_bounds(request.page_size, request.page_token)
        lines, more = await asyncio.to_thread(
            read_session_log, self.session_logs, session_id, offset=offset, limit=limit
        )
        entries = [log_entry(line) for line in lines]
        return api.SessionLog(entries=entries, next_page_token=res.next_token(limit, offset, limit + 1 if more else 0))

    # ---- restore points -------------------------------------------------------------------------------

    @handle_errors
    async def ListRestorePoints(self, request: api.ListJobRestorePointsRequest, context: Any) -> Any:
        require_role(context, *READ)
        job_id = await self._job_id("parent", request.parent)
        order = [RestorePoint.created_at, RestorePoint.id]
        rows, token = await self._list(
            RestorePoint, request.page_size, request.page_token, order, RestorePoint.job_id == job_id
        )
        job_name = request.parent.removeprefix("jobs/")
        points = [
            api.JobRestorePoint(
                name=f"jobs/{job_name}/restorePoints/{p.id}",
                vm_id=p.vm_id,
                session=f"sessions/{p.session_id}",
                create_time=res.timestamp(p.created_at),
            )
            for p in rows
        ]
        return api.ListJobRestorePointsResponse(restore_points=points, next_page_token=token)
