"""ControllerService, sessions: read and watch them, their logs and the job's restore points."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from controller.api import paging
from controller.api.base import RESTORE_POINTS, SESSIONS, WATCH_INTERVAL, ApiBase
from controller.api.resources.replicas import point_msg
from controller.api.sessions_view import log_entry
from controller.db.models import (
    RestorePoint,
    Session,
)
from controller.observability.session_log import read_session_log
from vmrepl.errors import NotFound
from vmrepl.rpc import handle_errors
from vmrepl.v1 import controller_pb2 as api


class SessionsApi(ApiBase):
    @handle_errors
    async def GetSession(self, request: api.GetSessionRequest, context: Any) -> api.Session:
        return await self._session(self._session_id("name", request.name))

    @handle_errors
    async def ListSessions(self, request: api.ListSessionsRequest, context: Any) -> api.ListSessionsResponse:
        where = Session.job_id == await self._job_id("job", request.job) if request.job else None
        out, token = await self._list(
            request, SESSIONS, self._session_msgs, where=where, maximum=paging.MAX_SESSION_PAGE
        )
        return api.ListSessionsResponse(sessions=out, next_page_token=token)

    @handle_errors
    async def WatchSession(self, request: api.WatchSessionRequest, context: Any) -> AsyncIterator[api.Session]:
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
    async def GetSessionLog(self, request: api.GetSessionLogRequest, context: Any) -> api.SessionLog:
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

    @handle_errors
    async def ListJobRestorePoints(
        self, request: api.ListJobRestorePointsRequest, context: Any
    ) -> api.ListJobRestorePointsResponse:
        job_id = await self._job_id("parent", request.parent)
        job_name = request.parent.removeprefix("jobs/")

        async def convert(_db: AsyncSession, rows: list[RestorePoint]) -> list[api.JobRestorePoint]:
            return [point_msg(job_name, p) for p in rows]

        points, token = await self._list(request, RESTORE_POINTS, convert, where=RestorePoint.job_id == job_id)
        return api.ListJobRestorePointsResponse(restore_points=points, next_page_token=token)
