"""The session engine's Prometheus counters: what it ended, and how (served by vmrepl.metrics).

They live with the engine that counts them; controller.observability.metrics keeps the gauges it reads
from the database.
"""

from __future__ import annotations

from prometheus_client import Counter

from controller.db.enums import SessionState, TaskState
from vmrepl.metrics import count_transfer
from vmrepl.v1 import proxy_pb2

SESSIONS_ENDED = Counter("vmrepl_sessions_ended_total", "Sessions ended by this controller, by outcome", ["state"])
TASKS_ENDED = Counter("vmrepl_tasks_ended_total", "Disk tasks ended, by outcome", ["state"])
BYTES = Counter("vmrepl_bytes_total", "Bytes of ended disk tasks by kind (read, data, sent, skipped reasons)", ["kind"])
STAGE_BUSY = Counter("vmrepl_stage_busy_seconds_total", "Busy seconds of ended disk tasks per stage", ["stage"])
RESUMES = Counter("vmrepl_stream_resumes_total", "Stream resumes inside disk tasks")
ERRORS = Counter("vmrepl_errors_total", "Failed disk tasks and sessions", ["what"])


def task_ended(state: TaskState, p: proxy_pb2.TransferProgress) -> None:
    TASKS_ENDED.labels(state.value).inc()
    if state is TaskState.FAILED:
        ERRORS.labels("task").inc()
    count_transfer(p, bytes_total=BYTES, stage_busy=STAGE_BUSY, resumes=RESUMES)


def session_ended(state: SessionState) -> None:
    SESSIONS_ENDED.labels(state.value).inc()
    if state is SessionState.FAILED:
        ERRORS.labels("session").inc()
