"""Operation sessions: started by StartReplicaOperation, continued after a crash, and test failovers stopped
at their deadline. Groups run one after another, the VMs of a group in parallel; a group with a VM that did
not end DONE stops the groups after it (their VMs end ROLLED_BACK, untouched)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import Callable, Sequence

from sqlalchemy import select

from controller.db.enums import Notification, OperationStepState, SessionKind, SessionState
from controller.db.models import Host, Job, OperationVm, Session, Target, TestFailover, now
from controller.engine.operations import records
from controller.engine.operations.admission import Admission, admit, resolve_vm
from controller.engine.operations.context import (
    HostView,
    NoReverseTransfer,
    OperationContext,
    OperationRequest,
    Replicator,
    ReverseTransfer,
)
from controller.engine.operations.plans import FINAL, Operation, outcome, plan_for
from controller.engine.operations.runner import VmOperation, describe
from controller.engine.runtime import EngineParts, TargetView
from controller.engine.states import ACTIVE_SESSION
from vmrepl.domain import PowerState
from vmrepl.errors import FailedPrecondition, NotFound, VmreplError
from vmrepl.logs import get_logger
from vmrepl.providers.base import NetworkMap

log = get_logger("vmrepl.controller.engine.operations")


def target_view(t: Target) -> TargetView:
    return TargetView(
        target_id=t.id, name=t.name, address=t.address, tls_server_name=t.tls_server_name, max_tasks=t.max_tasks
    )


class Operations:
    def __init__(
        self,
        parts: EngineParts,
        *,
        replicator: Replicator | None = None,
        reverse: ReverseTransfer | None = None,
        clock: Callable[[], dt.datetime] = now,
        shutdown_seconds: float = 300.0,
    ) -> None:
        self.parts = parts
        self.replicator = replicator
        self.reverse = reverse or NoReverseTransfer()
        self.clock = clock
        self.shutdown_seconds = shutdown_seconds
        self._runs: dict[str, asyncio.Task[SessionState]] = {}

    async def start(
        self, job_id: str, operation: Operation, groups: Sequence[Sequence[str]], request: OperationRequest
    ) -> Session:
        if operation is Operation.FAILBACK and not request.failback_host:  # a new location leaves the original be
            await self._originals_off(job_id, [ref for group in groups for ref in group])
        async with self.parts.journal.change("operation session created", job_id=job_id) as db:
            job = await db.get(Job, job_id)
            if job is None:
                raise NotFound(f"job {job_id} does not exist")
            host = await db.get(Host, job.failover_host_id) if job.failover_host_id else None
            plan = plan_for(operation, host_provider=host.provider if host else "file")
            session = await admit(
                db, Admission(job=job, operation=operation, plan=plan, groups=groups, request=request)
            )
        log.info("operation_started", session_id=session.id, operation=operation.value, job=job.name)
        self._launch(session.id)
        return session

    async def _originals_off(self, job_id: str, refs: list[str]) -> None:
        """A failback is refused at once while an original VM runs (its first step checks again: the host is
        asked here outside the journal's transaction, and the VM could be started in between)."""
        async with self.parts.journal.read() as db:
            job = await db.get(Job, job_id)
            host = await db.get(Host, job.host_id) if job is not None else None
            if job is None or host is None:
                return  # the admission says what is missing
            provider = await self.parts.providers.for_host(db, host)
            vms = [await resolve_vm(db, job, ref) for ref in refs]
        for vm in vms:
            info = await provider.get_vm(vm.vm_id)
            if info.power is not PowerState.OFF:
                raise FailedPrecondition(
                    f"the original VM {info.name} is {info.power.value}: "
                    "shut it down before failing back onto its disks"
                )

    async def recover(self) -> None:
        """Continue every operation session a previous run left running (its VMs resume or roll back)."""
        async with self.parts.journal.read() as db:
            left = list(
                await db.scalars(
                    select(Session.id).where(Session.kind == SessionKind.OPERATION, Session.state.in_(ACTIVE_SESSION))
                )
            )
        for session_id in left:
            log.info("operation_continued", session_id=session_id)
            self._launch(session_id)

    def _launch(self, session_id: str) -> None:
        task = asyncio.create_task(self._run(session_id), name=f"operation-{session_id}")
        self._runs[session_id] = task
        task.add_done_callback(lambda _t: self._runs.pop(session_id, None))

    async def wait(self, session_id: str) -> None:
        """Until the session's run ends (tests; a run not in this process has ended already)."""
        task = self._runs.get(session_id)
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(task)

    async def _run(self, session_id: str) -> SessionState:
        try:
            ctx = await self._context(session_id)
            return await self._groups(ctx)
        except asyncio.CancelledError:
            raise
        except VmreplError as e:
            return await self._close(session_id, error=describe(e))
        except Exception as e:  # a bug: the session must not stay "running" for ever
            log.exception("operation_crashed", session_id=session_id)
            return await self._close(session_id, error=f"internal error: {type(e).__name__}; see the controller's log")

    async def _context(self, session_id: str) -> OperationContext:
        async with self.parts.journal.read() as db:
            session = await db.get(Session, session_id)
            job = await db.get(Job, session.job_id) if session else None
            if session is None or job is None:
                raise NotFound(f"operation session {session_id} or its job no longer exists")
            target, source = await db.get(Target, job.target_id), await db.get(Host, job.host_id)
            if target is None or source is None:
                raise NotFound(f"job {job.name}: its target or host no longer exists")
            failover = await db.get(Host, job.failover_host_id) if job.failover_host_id else None
            failback = await db.get(Target, job.failback_target_id) if job.failback_target_id else None
            source_provider = await self.parts.providers.for_host(db, source)
            failover_provider = await self.parts.providers.for_host(db, failover) if failover else None
        view = target_view(target)
        return OperationContext(
            session_id=session_id,
            started_at=session.started_at,
            operation=Operation(session.operation),
            request=OperationRequest.from_json(session.request),
            job_id=job.id,
            job_name=job.name,
            replica_root=job.replica_root,
            block_size=job.block_size,
            target=view,
            target_client=self.parts.agents.target(view.address, view.tls_server_name),
            source_host_id=source.id,
            source=source_provider,
            failover_host_id=failover.id if failover else "",
            failover_provider_kind=failover.provider if failover else "",
            failover=failover_provider,
            networks=tuple(NetworkMap(str(m["source_switch"]), str(m["target_switch"])) for m in job.network_mapping),
            failback_target=target_view(failback) if failback else None,
            replicator=self.replicator,
            reverse=self.reverse,
            hosts=self._host_view,
            shutdown_seconds=self.shutdown_seconds,
        )

    async def _host_view(self, host_id: str) -> HostView:
        async with self.parts.journal.read() as db:
            host = await db.get(Host, host_id)
            if host is None:
                raise NotFound(f"host {host_id} no longer exists")
            provider = await self.parts.providers.for_host(db, host)
        return HostView(
            host_id=host.id, name=host.name, provider_kind=host.provider, address=host.address, provider=provider
        )

    async def _rows(self, session_id: str) -> list[OperationVm]:
        async with self.parts.journal.read() as db:
            q = (
                select(OperationVm)
                .where(OperationVm.session_id == session_id)
                .order_by(OperationVm.group, OperationVm.id)
            )
            return list(await db.scalars(q))

    async def _groups(self, ctx: OperationContext) -> SessionState:
        rows = await self._rows(ctx.session_id)
        kind = ctx.failover_provider_kind or "file"
        for group in sorted({r.group for r in rows}):
            members = [r for r in rows if r.group == group]
            ended = await asyncio.gather(
                *(
                    VmOperation(
                        ctx,
                        self.parts.journal,
                        # A failback to a new location, its commit and its undo have steps of their own.
                        plan_for(ctx.operation, host_provider=kind, new_location=bool(r.data.get("new_host_id"))),
                        r.id,
                        on_change=self.parts.live.poke,
                    ).run()
                    for r in members
                )
            )
            if any(s is not OperationStepState.DONE for s in ended):
                await self._skip_rest(ctx, group)
                break
        return await self._close(ctx.session_id)

    async def _skip_rest(self, ctx: OperationContext, failed_group: int) -> None:
        """The groups after one that failed are not run: their VMs go back as they were."""
        for row in await self._rows(ctx.session_id):
            if row.group <= failed_group or row.state is not OperationStepState.PLANNED:
                continue
            async with self.parts.journal.change("operation vm skipped", session_id=ctx.session_id, vm=row.vm_id) as db:
                r = await db.get(OperationVm, row.id)
                if r is not None:
                    r.state, r.ended_at = OperationStepState.ROLLED_BACK, now()
                    r.error = f"not run: a VM of group {failed_group} did not complete"
                    await records.record_rolled_back(db, ctx, r)

    async def _close(self, session_id: str, *, error: str = "") -> SessionState:
        async with self.parts.journal.change("operation session ended", session_id=session_id) as db:
            rows = list(await db.scalars(select(OperationVm).where(OperationVm.session_id == session_id)))
            for r in rows:  # only when the run could not start: nothing acted on a row left unfinished
                if r.state not in FINAL:
                    r.state, r.error, r.ended_at = OperationStepState.FAILED, error or "not run", now()
                    await records.release(db, session_id, r)
            state = SessionState(outcome([r.state for r in rows])) if not error else SessionState.FAILED
            session = await db.get(Session, session_id)
            job = await db.get(Job, session.job_id) if session is not None else None
            if session is not None:
                session.state, session.ended_at = state, now()
                # Recorded with the end state, as a replication session's: delivered after a crash too.
                webhook = job is not None and job.has_webhook
                session.notification = Notification.PENDING if webhook else Notification.NONE
                session.error = error or next(
                    (f"{r.vm_name}: {r.error}" for r in rows if r.error and r.state is not OperationStepState.DONE), ""
                )
        self.parts.live.forget(session_id)  # a watcher sees the end at once
        log.info("operation_ended", session_id=session_id, state=state.value, error=error or None)
        return state

    async def shutdown(self, grace: float) -> None:
        """SIGTERM: the runs are cancelled between journal writes; the next start continues each from its step."""
        tasks = list(self._runs.values())
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(t, grace)

    async def expire_tests(self) -> None:
        """One pass of the deadline loop: each test failover past its deadline is stopped (a STOP_TEST session,
        started once: the test records it)."""
        async with self.parts.journal.read() as db:
            due = list(
                await db.scalars(
                    select(TestFailover).where(
                        TestFailover.deadline <= self.clock(), TestFailover.stop_session_id == ""
                    )
                )
            )
        for test in due:
            try:
                session = await self.start(
                    test.job_id, Operation.STOP_TEST, [[test.vm_id]], OperationRequest(test_id=test.id)
                )
            except VmreplError as e:  # the VM busy with another operation: tried again at the next pass
                log.info("test_failover_stop_deferred", test_id=test.id, reason=describe(e))
                continue
            async with self.parts.journal.write() as db:
                row = await db.get(TestFailover, test.id)
                if row is not None:
                    row.stop_session_id = session.id
            log.info("test_failover_expired", test_id=test.id, session_id=session.id)
