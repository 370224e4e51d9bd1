"""The scheduler: each tick, starts the jobs that are due and stops sessions whose backup window closed.

Decisions are controller.scheduling.schedule's (pure); this loop reads the jobs and their sessions, asks, and acts
through the engine. Its bookmark per job (`jobs.schedule_handled_until`) is written with each decision,
so slots missed while the controller was down start one run when it is back (if inside the permitted
hours), not one per missed slot. The clock is injected: tests drive it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import NoReturn, Protocol

from sqlalchemy import func, select

from controller.db.enums import SessionKind, SessionState
from controller.db.models import Job, Session
from controller.engine.journal import Journal
from controller.engine.states import ACTIVE_SESSION
from controller.scheduling.schedule import (
    Decision,
    Schedule,
    decide_after,
    decide_continuous,
    decide_timed,
    parse_schedule,
)
from vmrepl.errors import VmreplError
from vmrepl.logs import get_logger
from vmrepl.supervise import every

# Operation sessions (a failover, a test failover) neither take a schedule's slot nor end a window: only
# replication sessions are the job's runs.
_REPLICATION = Session.kind == SessionKind.REPLICATION

log = get_logger("vmrepl.controller.scheduling.scheduler")


class Sessions(Protocol):
    """What the scheduler needs of the engine."""

    async def start_job(self, job_id: str) -> Session: ...

    async def stop_job(self, job_id: str) -> Session: ...


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Scheduler:
    def __init__(
        self, *, journal: Journal, engine: Sessions, clock: Callable[[], dt.datetime] = utc_now, tick: float = 1.0
    ) -> None:
        self.journal = journal
        self.engine = engine
        self.clock = clock
        self.tick = tick
        self._invalid: set[str] = set()  # jobs whose bad schedule was logged once

    async def run(self) -> NoReturn:
        await every(self.tick, self.tick_once, name="scheduler")  # a failed tick is logged and tried again

    async def tick_once(self) -> None:
        now = self.clock()
        async with self.journal.read() as db:
            jobs = list(await db.scalars(select(Job).where(Job.enabled.is_(True)).order_by(Job.name)))
        for job in jobs:
            schedule = self._schedule(job)
            if schedule is None:
                continue
            active = await self._active_session(job.id)
            if active is not None and schedule.window_closed(now):
                session_id, state = active
                if state is SessionState.RUNNING:  # once: a stopping session is already on its way out
                    log.info("backup_window_closed", job=job.name, session_id=session_id)
                    await self.engine.stop_job(job.id)
                continue
            decision = await self._decide(job, schedule, now=now, running=active is not None)
            await self._act(job, decision)

    def _schedule(self, job: Job) -> Schedule | None:
        if not job.schedule:
            return None
        try:
            return parse_schedule(dict(job.schedule))
        except VmreplError as e:
            if job.id not in self._invalid:  # validated by the API; reaches here only from an old row
                log.warning("schedule_invalid", job=job.name, error=str(e))
                self._invalid.add(job.id)
            return None

    async def _active_session(self, job_id: str) -> tuple[str, SessionState] | None:
        async with self.journal.read() as db:
            row = (
                await db.execute(
                    select(Session.id, Session.state).where(
                        Session.job_id == job_id, _REPLICATION, Session.state.in_(ACTIVE_SESSION)
                    )
                )
            ).first()
        return None if row is None else (row[0], row[1])

    async def _last_end(self, job_id: str) -> dt.datetime | None:
        async with self.journal.read() as db:
            return await db.scalar(select(func.max(Session.ended_at)).where(Session.job_id == job_id, _REPLICATION))

    async def _decide(self, job: Job, s: Schedule, *, now: dt.datetime, running: bool) -> Decision:
        handled = job.schedule_handled_until or job.created_at or now
        if s.kind in ("cron", "interval"):
            return decide_timed(s, now=now, handled_until=handled, running=running)
        if s.kind == "continuous":
            return decide_continuous(s, now=now, running=running, last_end=await self._last_end(job.id))
        if s.kind == "after":
            async with self.journal.read() as db:
                upstream = await db.scalar(select(Job.id).where(Job.name == s.after_job.removeprefix("jobs/")))
            upstream_end = await self._last_end(upstream) if upstream else None
            return decide_after(s, now=now, running=running, handled_until=handled, upstream_end=upstream_end)
        return Decision(False, None)

    async def _act(self, job: Job, decision: Decision) -> None:
        if decision.handled_until is not None and decision.handled_until != job.schedule_handled_until:
            async with self.journal.write() as db:
                row = await db.get(Job, job.id)
                if row is not None:
                    row.schedule_handled_until = decision.handled_until
        if decision.reason and not decision.start:
            log.info("scheduled_run_skipped", job=job.name, reason=decision.reason, slot=str(decision.handled_until))
        if decision.start:
            try:
                session = await self.engine.start_job(job.id)
            except VmreplError as e:
                log.warning("scheduled_start_refused", job=job.name, error=str(e))
                return
            log.info("scheduled_start", job=job.name, session_id=session.id, reason=decision.reason)
