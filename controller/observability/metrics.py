"""The controller's Prometheus metrics (served by vmrepl.metrics)."""

from __future__ import annotations

import functools
from typing import NoReturn

from prometheus_client import Counter, Gauge
from sqlalchemy import func, select

from controller.db.enums import SessionState, TaskState
from controller.db.models import Session, Task
from controller.engine.journal import Journal
from controller.engine.states import ACTIVE_SESSION
from vmrepl.metrics import count_transfer
from vmrepl.supervise import every
from vmrepl.v1 import proxy_pb2

SESSIONS = Gauge("vmrepl_sessions", "Sessions in the database, by state", ["state"])
TASKS = Gauge(
    "vmrepl_tasks", "Disk tasks of running sessions: running (on a proxy) and waiting (for a slot)", ["state"]
)
SESSIONS_ENDED = Counter("vmrepl_sessions_ended_total", "Sessions ended by this controller, by outcome", ["state"])
TASKS_ENDED = Counter("vmrepl_tasks_ended_total", "Disk tasks ended, by outcome", ["state"])
BYTES = Counter("vmrepl_bytes_total", "Bytes of ended disk tasks by kind (read, data, sent, skipped reasons)", ["kind"])
STAGE_BUSY = Counter("vmrepl_stage_busy_seconds_total", "Busy seconds of ended disk tasks per stage", ["stage"])
RESUMES = Counter("vmrepl_stream_resumes_total", "Stream resumes inside disk tasks")
ERRORS = Counter("vmrepl_errors_total", "Failed disk tasks and sessions", ["what"])
REFRESH_SECONDS = 2.0


def task_ended(state: TaskState, p: proxy_pb2.TransferProgress) -> None:
    TASKS_ENDED.labels(state.value).inc()
    if state is TaskState.FAILED:
        ERRORS.labels("task").inc()
    count_transfer(p, bytes_total=BYTES, stage_busy=STAGE_BUSY, resumes=RESUMES)


def session_ended(state: SessionState) -> None:
    SESSIONS_ENDED.labels(state.value).inc()
    if state is SessionState.FAILED:
        ERRORS.labels("session").inc()


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
