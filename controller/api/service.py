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
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from controller.api import paging
from controller.api import resources as res
from controller.api.sessions_view import log_entry, session_msg
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
from controller.engine.journal import Journal
from controller.engine.providers import check_host
from controller.engine.runtime import LiveProgress
from controller.engine.sessions import ACTIVE, Engine
from controller.observability.session_log import read_session_log
from vmrepl.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from vmrepl.rpc import handle_errors
from vmrepl.security.tls import require_role
from vmrepl.v1 import controller_pb2 as api
from vmrepl.v1 import controller_pb2_grpc

READ = ("operator", "reader")
WRITE = ("operator",)
WATCH_INTERVAL = 0.5
M = TypeVar("M")
R = TypeVar("R")
# The sort key of each list (unique, indexed): configuration by id, sessions newest first, points oldest first.
BY_NAME: dict[Any, paging.Keyset] = {
    m: paging.Keyset(m.__tablename__, [m.name]) for m in (Credential, Host, Proxy, Target, Job)
}
SESSIONS = paging.Keyset("sessions", [Session.started_at, Session.id], descending=True)
RESTORE_POINTS = paging.Keyset("restorePoints", [RestorePoint.created_at, RestorePoint.id])


class ControllerServicer(controller_pb2_grpc.ControllerServiceServicer):
    def __init__(
        self,
        *,
        journal: Journal,
        reads: async_sessionmaker[AsyncSession],
        engine: Engine,
        secrets: SecretBox,
        live: LiveProgress,
        session_logs: Path,
    ) -> None:
        self.session_logs = session_logs
        self.journal = journal  # writes, serialised with the session engine's
        # Reads on a pool of their own: however many calls wait for a connection, the engine never does.
        self.reads = reads
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

    async def _list(
        self,
        request: Any,
        keyset: paging.Keyset,
        convert: Callable[[AsyncSession, list[M]], Awaitable[list[R]]],
        *,
        where: Any = None,
        maximum: int = paging.MAX_PAGE,
    ) -> tuple[list[R], str]:
        """One page of a list, by key: an indexed range read however deep the page (controller.api.paging)."""
        limit = paging.page_size(request.page_size, maximum)
        q = paging.page_query(keyset, limit=limit, token=request.page_token, where=where)
        async with self.reads() as db:
            rows = list(await db.scalars(q))
            return await convert(db, rows[:limit]), paging.next_key_token(keyset, rows, limit)

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
        async with self.reads() as db:
            return res.credential_msg(await res.by_name(db, Credential, "name", request.name, "credentials"))

    @handle_errors
    async def ListCredentials(self, request: api.ListCredentialsRequest, context: Any) -> Any:
        require_role(context, *READ)

        async def convert(_db: AsyncSession, rows: list[Credential]) -> list[api.Credential]:
            return [res.credential_msg(r) for r in rows]

        out, token = await self._list(request, BY_NAME[Credential], convert)
        return api.ListCredentialsResponse(credentials=out, next_page_token=token)

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
        async with self.reads() as db:
            return await res.host_msg(db, row)

    @handle_errors
    async def GetHost(self, request: api.GetHostRequest, context: Any) -> Any:
        require_role(context, *READ)
        async with self.reads() as db:
            return await res.host_msg(db, await res.by_name(db, Host, "name", request.name, "hosts"))

    @handle_errors
    async def ListHosts(self, request: api.ListHostsRequest, context: Any) -> Any:
        require_role(context, *READ)

        async def convert(db: AsyncSession, rows: list[Host]) -> list[api.Host]:
            return [await res.host_msg(db, r) for r in rows]

        out, token = await self._list(request, BY_NAME[Host], convert)
        return api.ListHostsResponse(hosts=out, next_page_token=token)

    @handle_errors
    async def UpdateHost(self, request: api.UpdateHostRequest, context: Any) -> Any:
        require_role(context, *WRITE)
        paths = res.mask_paths("update_mask", request.update_mask.paths, res.HOST_FIELDS)
        async with self.journal.write() as db:
            row = await res.by_name(db, Host, "host.name", request.host.name, "hosts")
            await res.apply_host(db, request.host, row, paths)
            await check_host(row)
        async with self.reads() as db:
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
        async with self.reads() as db:
            return await res.proxy_msg(db, row)

    @handle_errors
    async def GetProxy(self, request: api.GetProxyRequest, context: Any) -> Any:
        require_role(context, *READ)
        async with self.reads() as db:
            return await res.proxy_msg(db, await res.by_name(db, Proxy, "name", request.name, "proxies"))

    @handle_errors
    async def ListProxies(self, request: api.ListProxiesRequest, context: Any) -> Any:
        require_role(context, *READ)

        async def convert(db: AsyncSession, rows: list[Proxy]) -> list[api.Proxy]:
            return [await res.proxy_msg(db, r) for r in rows]

        out, token = await self._list(request, BY_NAME[Proxy], convert)
        return api.ListProxiesResponse(proxies=out, next_page_token=token)

    @handle_errors
    async def UpdateProxy(self, request: api.UpdateProxyRequest, context: Any) -> Any:
        require_role(context, *WRITE)
        paths = res.mask_paths("update_mask", request.update_mask.paths, res.PROXY_FIELDS)
        async with self.journal.write() as db:
            row = await res.by_name(db, Proxy, "proxy.name", request.proxy.name, "proxies")
            await res.apply_agent(db, "proxy", request.proxy, row, paths)
        async with self.reads() as db:
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
        async with self.reads() as db:
            return res.target_msg(await res.by_name(db, Target, "name", request.name, "targets"))

    @handle_errors
    async def ListTargets(self, request: api.ListTargetsRequest, context: Any) -> Any:
        require_role(context, *READ)

        async def convert(_db: AsyncSession, rows: list[Target]) -> list[api.Target]:
            return [res.target_msg(r) for r in rows]

        out, token = await self._list(request, BY_NAME[Target], convert)
        return api.ListTargetsResponse(targets=out, next_page_token=token)

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
            await res.apply_job(db, request.job, row, res.JOB_FIELDS, secrets=self.secrets)

        row = await self._create(Job, "job_id", request.job_id, "jobs", fill)
        async with self.reads() as db:
            job = await db.get(Job, row.id)
            if job is None:
                raise NotFound(f"jobs/{request.job_id} was deleted meanwhile")
            return await res.job_msg(db, job)

    @handle_errors
    async def GetJob(self, request: api.GetJobRequest, context: Any) -> Any:
        require_role(context, *READ)
        async with self.reads() as db:
            return await res.job_msg(db, await res.by_name(db, Job, "name", request.name, "jobs"))

    @handle_errors
    async def ListJobs(self, request: api.ListJobsRequest, context: Any) -> Any:
        require_role(context, *READ)

        async def convert(db: AsyncSession, rows: list[Job]) -> list[api.Job]:
            return [await res.job_msg(db, r) for r in rows]

        out, token = await self._list(request, BY_NAME[Job], convert)
        return api.ListJobsResponse(jobs=out, next_page_token=token)

    @handle_errors
    async def UpdateJob(self, request: api.UpdateJobRequest, context: Any) -> Any:
        require_role(context, *WRITE)
        paths = res.mask_paths("update_mask", request.update_mask.paths, res.JOB_FIELDS)
        async with self.journal.write() as db:
            row = await res.by_name(db, Job, "job.name", request.job.name, "jobs")
            await res.apply_job(db, request.job, row, paths, secrets=self.secrets)
        async with self.reads() as db:
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
        async with self.reads() as db:
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
        async with self.reads() as db:
            row = await db.get(Session, session_id)
            if row is None:
                raise NotFound(f"sessions/{session_id} does not exist")
            return (await self._session_msgs(db, [row]))[0]

    async def _session_msgs(self, db: AsyncSession, rows: list[Session]) -> list[api.Session]:
        """Sessions as the API shows them: four queries for a whole page, not four per session."""
        if not rows:
            return []
        ids = [r.id for r in rows]
        vms: dict[str, list[SessionVm]] = {i: [] for i in ids}
        for v in await db.scalars(select(SessionVm).where(SessionVm.session_id.in_(ids)).order_by(SessionVm.vm_name)):
            vms[v.session_id].append(v)
        tasks: dict[str, list[Task]] = {i: [] for i in ids}
        for t in await db.scalars(select(Task).where(Task.session_id.in_(ids)).order_by(Task.disk_id)):
            tasks[t.session_id].append(t)
        job_ids = {r.job_id for r in rows}
        jobs = {j: n for j, n in (await db.execute(select(Job.id, Job.name).where(Job.id.in_(job_ids)))).tuples()}
        proxies = {p: n for p, n in (await db.execute(select(Proxy.id, Proxy.name))).tuples()}
        out = []
        for i, r in enumerate(rows, 1):
            out.append(
                session_msg(
                    r, jobs.get(r.job_id, ""), vms[r.id], tasks[r.id], proxies=proxies, live=self.live.get(r.id)
                )
            )
            if i % 10 == 0:  # a large page gives the event loop (the engine, other callers) a turn now and then
                await asyncio.sleep(0)
        return out

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
        out, token = await self._list(
            request, SESSIONS, self._session_msgs, where=where, maximum=paging.MAX_SESSION_PAGE
        )
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
        async with self.reads() as db:
            if await db.scalar(select(Session.id).where(Session.id == session_id)) is None:
                raise NotFound(f"sessions/{session_id} does not exist")
        limit, offset = paging.page_size(request.page_size), paging.line_offset(request.page_token)
        lines, more = await asyncio.to_thread(
            read_session_log, self.session_logs, session_id, offset=offset, limit=limit
        )
        entries = [log_entry(line) for line in lines]
        return api.SessionLog(entries=entries, next_page_token=paging.line_token(offset + limit) if more else "")

    # ---- restore points -------------------------------------------------------------------------------

    @handle_errors
    async def ListRestorePoints(self, request: api.ListJobRestorePointsRequest, context: Any) -> Any:
        require_role(context, *READ)
        job_id = await self._job_id("parent", request.parent)
        job_name = request.parent.removeprefix("jobs/")

        async def convert(_db: AsyncSession, rows: list[RestorePoint]) -> list[api.JobRestorePoint]:
            return [
                api.JobRestorePoint(
                    name=f"jobs/{job_name}/restorePoints/{p.id}",
                    vm_id=p.vm_id,
                    session=f"sessions/{p.session_id}",
                    create_time=res.timestamp(p.created_at),
                )
                for p in rows
            ]

        points, token = await self._list(request, RESTORE_POINTS, convert, where=RestorePoint.job_id == job_id)
        return api.ListJobRestorePointsResponse(restore_points=points, next_page_token=token)
