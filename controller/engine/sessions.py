"""The session engine: starts and stops sessions of jobs, and continues those a crash interrupted.

One controller process owns the database. At start it continues every
session left running or stopping (SessionRun carries on from the recorded
states); StartJob refuses a job that already has one; StopJob and SIGTERM
record STOPPING and cancel the transfers, which leaves the disks resumable.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

from sqlalchemy import select

from controller.db.enums import SessionKind, SessionState
from controller.db.models import Host, Job, Session, Target, now
from controller.engine.operations.context import ReverseTransfer
from controller.engine.operations.service import Operations
from controller.engine.runtime import EngineParts, JobView, SessionContext, TargetView
from controller.engine.session import SessionRun, describe
from controller.engine.states import ACTIVE_SESSION
from vmrepl.domain import ChangeTracking, Compression, replica_format
from vmrepl.errors import FailedPrecondition, NotFound, VmreplError
from vmrepl.logs import get_logger

log = get_logger("vmrepl.controller.engine.sessions")


def job_view(job: Job, *, host_provider: str = "file") -> JobView:
    return JobView(
        job_id=job.id,
        name=job.name,
        host_id=job.host_id,
        replica_root=job.replica_root,
        restore_points_to_keep=job.restore_points_to_keep,
        compression=Compression(job.compression),
        block_size=job.block_size,
        bandwidth_limit_mbps=job.bandwidth_limit_mbps,
        change_tracking=ChangeTracking(job.change_tracking),
        guest_processing=dict(job.guest_processing),
        checkpoint_hold_seconds=job.checkpoint_hold_seconds,
        retries=job.retries,
        retry_wait_seconds=job.retry_wait_seconds,
        full_check_every=job.full_check_every,
        replica_format=replica_format(job.replica_format, host_provider=host_provider),
    )


# Replication sessions: a job runs one at a time; operation sessions (controller.engine.operations) run beside.
_REPLICATION = Session.kind == SessionKind.REPLICATION


class Engine:
    def __init__(self, parts: EngineParts, *, reverse: ReverseTransfer | None = None) -> None:
        self.parts = parts
        # Failover, failback, test failover: their sessions, continued by recover() too.
        self.operations = Operations(parts, replicator=self, reverse=reverse)
        self._runs: dict[str, tuple[SessionContext, asyncio.Task[SessionState]]] = {}
        # Jobs whose replicas an operator's call is changing on the target (a rollback): no session starts.
        self._maintenance: dict[str, str] = {}

    @contextlib.asynccontextmanager
    async def replica_maintenance(self, job_id: str, what: str) -> AsyncIterator[None]:
        """Work on a job's replicas that no session of the job may run under (a rollback under a session's
        writes would undo what its restore point then claims). Refused with FailedPrecondition while a
        session of the job runs; start_job refuses the job meanwhile. The job is marked before the check,
        and the check reads under the journal's lock, which start_job's insert holds: a start either
        committed before the check (and is seen) or comes after the mark (and is refused)."""
        if job_id in self._maintenance:
            raise FailedPrecondition(f"the job's replicas are busy: {self._maintenance[job_id]}")
        self._maintenance[job_id] = what
        try:
            async with self.parts.journal.write() as db:
                running = await db.scalar(
                    select(Session).where(Session.job_id == job_id, Session.state.in_(ACTIVE_SESSION))
                )
                job = await db.get(Job, job_id)
            if running is not None:
                name = job.name if job else job_id
                raise FailedPrecondition(
                    f"job {name} has a running session ({running.id}): its replicas change only between sessions"
                )
            yield
        finally:
            self._maintenance.pop(job_id, None)

    async def recover(self) -> None:
        """Continue every session a previous run of the controller left running or stopping."""
        async with self.parts.journal.read() as db:
            left = list(
                await db.scalars(
                    select(Session).where(_REPLICATION, Session.state.in_(ACTIVE_SESSION)).order_by(Session.started_at)
                )
            )
        for s in left:
            log.info("session_continued", session_id=s.id, state=s.state)
            await self._launch(s.id, stopping=s.state is SessionState.STOPPING)
        await self.operations.recover()

    async def start_replication(self, job_id: str, *, only_vms: Sequence[str]) -> str:
        """A session replicating these VMs of the job only (a planned failover's last incremental)."""
        return (await self.start_job(job_id, only_vms=only_vms)).id

    async def start_job(self, job_id: str, *, full_check: bool = False, only_vms: Sequence[str] = ()) -> Session:
        """A new session of the job; `full_check`: every VM's incremental compares every block (a full check)."""
        async with self.parts.journal.change("session created", job_id=job_id) as db:
            job = await db.get(Job, job_id)
            if job is None:
                raise NotFound(f"job {job_id} does not exist")
            if not job.enabled:
                raise FailedPrecondition(f"job {job.name} is disabled")
            if job_id in self._maintenance:
                raise FailedPrecondition(
                    f"job {job.name} cannot start now: {self._maintenance[job_id]}; start it when that has ended"
                )
            running = await db.scalar(
                select(Session).where(Session.job_id == job_id, _REPLICATION, Session.state.in_(ACTIVE_SESSION))
            )
            if running is not None:
                raise FailedPrecondition(f"job {job.name} is already running (session {running.id})")
            session = Session(
                job_id=job_id,
                state=SessionState.RUNNING,
                started_at=now(),
                full_check=full_check,
                only_vms=list(only_vms),
            )
            db.add(session)
        await self._launch(session.id, stopping=False)
        return session

    async def stop_job(self, job_id: str) -> Session:
        async with self.parts.journal.read() as db:
            session = await db.scalar(
                select(Session).where(Session.job_id == job_id, _REPLICATION, Session.state.in_(ACTIVE_SESSION))
            )
            job = await db.get(Job, job_id)
        if session is None:
            raise FailedPrecondition(f"job {job.name if job else job_id} has no running session")
        await self._stop(session.id)
        return session

    async def _stop(self, session_id: str) -> None:
        async with self.parts.journal.change("session stopping", session_id=session_id) as db:
            row = await db.get(Session, session_id)
            if row is not None and row.state is SessionState.RUNNING:
                row.state = SessionState.STOPPING
        run = self._runs.get(session_id)
        if run is not None:
            run[0].stopping.set()
        log.info("session_stopping", session_id=session_id)

    async def _context(self, session_id: str) -> SessionContext:
        async with self.parts.journal.read() as db:
            session = await db.get(Session, session_id)
            job = await db.get(Job, session.job_id) if session else None
            if session is None or job is None:
                raise NotFound(f"session {session_id} or its job no longer exists")
            target = await db.get(Target, job.target_id)
            host = await db.get(Host, job.host_id)
            if target is None or host is None:
                raise NotFound(f"job {job.name}: its target or host no longer exists")
            provider = await self.parts.providers.for_host(db, host)
        return SessionContext(
            session_id=session_id,
            job=job_view(job, host_provider=host.provider),
            target=TargetView(
                target_id=target.id,
                name=target.name,
                address=target.address,
                tls_server_name=target.tls_server_name,
                max_tasks=target.max_tasks,
            ),
            provider=provider,
            full_check=session.full_check,
        )

    async def _launch(self, session_id: str, *, stopping: bool) -> None:
        try:
            sc = await self._context(session_id)
        except VmreplError as e:
            await self._fail(session_id, describe(e))
            return
        if stopping:
            sc.stopping.set()
        task = asyncio.create_task(self._run(sc), name=f"session-{session_id}")
        self._runs[session_id] = (sc, task)
        task.add_done_callback(lambda _t: self._runs.pop(session_id, None))

    async def _run(self, sc: SessionContext) -> SessionState:
        try:
            return await SessionRun(self.parts, sc).run()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            # A bug, not an outside failure: the session must not be left "running" for ever.
            log.exception("session_crashed", session_id=sc.session_id)
            await self._fail(sc.session_id, f"internal error: {type(e).__name__}; see the controller's log")
            return SessionState.FAILED

    async def _fail(self, session_id: str, error: str) -> None:
        async with self.parts.journal.change("session ended", session_id=session_id) as db:
            row = await db.get(Session, session_id)
            if row is not None:
                row.state, row.error, row.ended_at = SessionState.FAILED, error, now()

    async def shutdown(self, grace: float) -> None:
        """SIGTERM: stop every session cleanly (disks stay resumable), waiting at most `grace` seconds."""
        await self.operations.shutdown(grace)
        for session_id in list(self._runs):
            await self._stop(session_id)
        tasks = [t for _, t in self._runs.values()]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=grace)
        for t in pending:
            t.cancel()
        for t in pending:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
