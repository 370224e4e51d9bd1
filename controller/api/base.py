"""What every part of the ControllerService shares: the database handles, the engine, and the shapes of
create, list (keyset pages, controller.api.paging), delete and session lookups."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from controller.api import paging
from controller.api import resources as res
from controller.api.sessions_view import session_msg
from controller.db.models import (
    Credential,
    Host,
    Job,
    OperationVm,
    Proxy,
    RestorePoint,
    Session,
    SessionVm,
    Target,
    Task,
)
from controller.db.secrets import SecretBox
from controller.engine.journal import Journal
from controller.engine.runtime import LiveProgress
from controller.engine.sessions import Engine
from vmrepl.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from vmrepl.v1 import controller_pb2 as api

WATCH_INTERVAL = 0.5
M = TypeVar("M")
R = TypeVar("R")
# The sort key of each list (unique, indexed): configuration by id, sessions newest first, points oldest first.
BY_NAME: dict[Any, paging.Keyset] = {
    m: paging.Keyset(m.__tablename__, [m.name]) for m in (Credential, Host, Proxy, Target, Job)
}
SESSIONS = paging.Keyset("sessions", [Session.started_at, Session.id], descending=True)
RESTORE_POINTS = paging.Keyset("restorePoints", [RestorePoint.created_at, RestorePoint.id])


class ApiBase:
    """State and helpers of the API; each section of the service (inventory, jobs, sessions) extends it."""

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
        # The engine's, so the API reaches hosts exactly as sessions do (and tests put fakes in one place).
        self.providers = engine.parts.providers

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

    async def _job_id(self, field: str, name: str) -> str:
        async with self.reads() as db:
            return (await res.by_name(db, Job, field, name, "jobs")).id

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
        ops: dict[str, list[OperationVm]] = {i: [] for i in ids}
        q = select(OperationVm).where(OperationVm.session_id.in_(ids)).order_by(OperationVm.group, OperationVm.vm_name)
        for o in await db.scalars(q):
            ops[o.session_id].append(o)
        tasks: dict[str, list[Task]] = {i: [] for i in ids}
        for t in await db.scalars(select(Task).where(Task.session_id.in_(ids)).order_by(Task.disk_id)):
            tasks[t.session_id].append(t)
        job_ids = {r.job_id for r in rows}
        jobs = {j: n for j, n in (await db.execute(select(Job.id, Job.name).where(Job.id.in_(job_ids)))).all()}
        proxies = {p: n for p, n in (await db.execute(select(Proxy.id, Proxy.name))).all()}
        out = []
        for i, r in enumerate(rows, 1):
            out.append(
                session_msg(
                    r,
                    jobs.get(r.job_id, ""),
                    vms[r.id],
                    tasks[r.id],
                    proxies=proxies,
                    live=self.live.get(r.id),
                    operation_vms=ops[r.id],
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
