"""The controller's Prometheus gauges, refreshed from the database (served by vmrepl.metrics; the engine's
counters of what it ended are in controller.engine.counters)."""

from __future__ import annotations

import functools
from typing import NoReturn

from prometheus_client import Gauge
from sqlalchemy import func, select

from controller.db.enums import SessionState, TaskState
from controller.db.models import Session, Task
from controller.engine.journal import Journal
from controller.engine.states import ACTIVE_SESSION
from vmrepl.supervise import every

SESSIONS = Gauge("vmrepl_sessions", "Sessions in the database, by state", ["state"])
TASKS = Gauge(
    "vmrepl_tasks", "Disk tasks of running sessions: running (on a proxy) and waiting (for a slot)", ["state"]
)
REFRESH_SECONDS = 2.0


async def refresh(journal: Journal) -> None:
    """Gauges from the database (sessions by state, tasks running and waiting)."""
    async with journal.read() as db:
        by_state = dict((await db.execute(select(Session.state, func.count()).group_by(Session.state))).all())
        active = select(Session.id).where(Session.state.in_(ACTIVE_SESSION))
        tasks = dict(
            (
                await db.execute(
                    select(Task.state, func.count()).where(Task.session_id.in_(active)).group_by(Task.state)
                )
            ).all()
        )
    for s in SessionState:
        SESSIONS.labels(s.value).set(by_state.get(s, 0))
    TASKS.labels("running").set(tasks.get(TaskState.STARTING, 0) + tasks.get(TaskState.RUNNING, 0))
    TASKS.labels("waiting").set(tasks.get(TaskState.PENDING, 0))


async def keep_fresh(journal: Journal) -> NoReturn:
    """The gauges refreshed every few seconds; a failed refresh (the database away) is logged and retried."""
    await every(REFRESH_SECONDS, functools.partial(refresh, journal), name="metrics")
