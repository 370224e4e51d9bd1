"""One session of a job: plan it, run each VM through its states, close it. Safe to run again after a crash.

The states of the session, of each VM (states.VmState) and of each task
(states.TaskState) are in the database, each written before the action it
names. `SessionRun.run` reads them and carries on from there, so continuing
a session after a controller restart is the same call as starting one:
planning is skipped when it was committed, each VM resumes at its state
(a checkpoint being created is cleaned up and taken again, a restore point
being committed is committed again, which the target makes idempotent per
session), and each task reattaches to its transfer or restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from sqlalchemy import Select, delete, select
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_exponential

from controller.db.enums import Notification, ReplicaEnd, SessionState, TaskState, VmState
from controller.db.models import HeldCheckpoint, Job, JobVm, RestorePoint, Session, SessionVm, Task, now
from controller.engine import counters
from controller.engine.agents import TargetClient, ready
from controller.engine.operations.holds import held_points, paused_vms
from controller.engine.retention import points_to_delete
from controller.engine.runtime import EngineParts, SessionContext
from controller.engine.states import (
    ACTIVE_SESSION,
    FINAL_VM,
    DiskStart,
    HeldCheckpointView,
    checkpoint_request,
    plan_vm,
    replica_session_end,
    session_outcome,
    vm_after_transfers,
)
from controller.engine.task import TaskRunner, transient
from vmrepl.domain import MAX_VM_CONFIGURATION, REPLICA_FORMATS, Consistency, DiskFormat
from vmrepl.errors import FailedPrecondition, NotFound, VmreplError
from vmrepl.logs import get_logger
from vmrepl.providers.base import Checkpoint, VmInfo
from vmrepl.v1 import common_pb2, target_pb2

log = get_logger("vmrepl.controller.engine.session")
ERRORS = (VmreplError, grpc.aio.AioRpcError)


def describe(e: BaseException) -> str:
    return e.details() or e.code().name if isinstance(e, grpc.aio.AioRpcError) else str(e)


class SessionRun:
    def __init__(self, parts: EngineParts, sc: SessionContext) -> None:
        self.parts = parts
        self.sc = sc
        self.log = log.bind(session_id=sc.session_id, job=sc.job.name)

    async def run(self) -> SessionState:
        try:
            await self._plan()
        except ERRORS as e:
            self.log.warning("session_not_started", error=describe(e))
            return await self._close(error=describe(e))
        async with self.parts.journal.read() as db:
            vm_ids = list(await db.scalars(select(SessionVm.id).where(SessionVm.session_id == self.sc.session_id)))
        await asyncio.gather(*(VmRun(self.parts, self.sc, vm_id).run() for vm_id in vm_ids))
        return await self._close()

    async def _plan(self) -> None:
        async with self.parts.journal.read() as db:
            planned = await db.scalar(select(SessionVm.id).where(SessionVm.session_id == self.sc.session_id).limit(1))
            job_vms = list(await db.scalars(select(JobVm).where(JobVm.job_id == self.sc.job.job_id)))
        if planned is not None:
            return
        target = self.parts.agents.target(self.sc.target.address, self.sc.target.tls_server_name)
        if not await ready(target):
            raise FailedPrecondition(f"target {self.sc.target.name} does not answer its health check")
        await self.sc.provider.check_host()  # a host sessions cannot replicate from (Hyper-V before 2016)
        entries: list[SessionVm | Task] = []
        named: dict[str, str] = {}  # VM id -> the reference that planned it
        for jv in job_vms:
            try:
                vm = await self.sc.provider.get_vm(jv.vm_ref)
                self.sc.replica_path(vm.vm_id)  # a VM whose id cannot name its replica folder fails here, alone
            except ERRORS as e:
                entries.append(
                    SessionVm(
                        session_id=self.sc.session_id,
                        vm_id=jv.vm_ref,
                        vm_name=jv.vm_ref,
                        state=VmState.FAILED,
                        error=describe(e),
                    )
                )
                continue
            if vm.vm_id in named:  # the job names it twice (by id and by name): one VM, replicated once
                self.log.warning("vm_named_twice", vm_id=vm.vm_id, refs=[named[vm.vm_id], jv.vm_ref])
                continue
            named[vm.vm_id] = jv.vm_ref
            entries += await self._plan_vm(vm, frozenset(str(d) for d in jv.excluded_disks))
        async with self.parts.journal.change("session planned", session_id=self.sc.session_id) as db:
            # Read in this transaction: an operation that claims a VM either committed before (and the VM is
            # skipped) or sees this plan (and refuses a failover of a VM being replicated).
            pause = await paused_vms(db, self.sc.session_id, self.sc.job.job_id)
            db.add_all([e for e in entries if not pause.skips(e.vm_id)])
        for vm_id, why in pause.paused.items():
            self.log.info("vm_skipped", vm_id=vm_id, reason=why)
        self.log.info("session_planned", vms=len(job_vms))

    async def _plan_vm(self, vm: VmInfo, excluded: frozenset[str]) -> list[SessionVm | Task]:
        disks = [d for d in vm.disks if d.disk_id not in excluded]
        async with self.parts.journal.read() as db:
            held: HeldCheckpoint | None = await db.scalar(held_checkpoint(self.sc.job.job_id, vm.vm_id))
            earlier = (
                list(await db.scalars(select(Task).where(Task.session_id == held.session_id, Task.vm_id == vm.vm_id)))
                if held is not None
                else []
            )
        view = None
        if held is not None:
            view = HeldCheckpointView(
                held.checkpoint_id,
                held.deadline,
                frozenset(t.disk_id for t in earlier if t.state is TaskState.RESUMABLE),
                frozenset(t.disk_id for t in earlier if t.state is TaskState.SUCCEEDED),
            )
        plan = plan_vm([d.disk_id for d in disks], view, now=now())
        row = SessionVm(session_id=self.sc.session_id, vm_id=vm.vm_id, vm_name=vm.name, state=VmState.PLANNED)
        if plan.reuse_checkpoint is not None and held is not None:
            row.state, row.checkpoint_id = VmState.TRANSFERRING, held.checkpoint_id
            row.checkpoint_reference, row.consistency = held.reference, held.consistency
        tasks: list[SessionVm | Task] = [row]
        for d in disks:
            start = plan.disks[d.disk_id]
            tasks.append(
                Task(
                    session_id=self.sc.session_id,
                    vm_id=vm.vm_id,
                    vm_name=vm.name,
                    disk_id=d.disk_id,
                    disk_size=d.size,
                    state=TaskState.PENDING,
                    start=start.value,
                    resume_session_id=held.session_id if start in _CONTINUES and held is not None else "",
                )
            )
        return tasks

    async def _close(self, *, error: str = "") -> SessionState:
        async with self.parts.journal.read() as db:
            tasks = list(await db.scalars(select(Task).where(Task.session_id == self.sc.session_id)))
            vms = list(await db.scalars(select(SessionVm).where(SessionVm.session_id == self.sc.session_id)))
        stopped = self.sc.stopping.is_set()
        if error or any(v.state is VmState.FAILED for v in vms):
            state = SessionState.FAILED
        else:
            state = session_outcome((t.state for t in tasks), stopped=stopped)
            if any(v.state in (VmState.HELD, VmState.STOPPED) for v in vms):
                state = SessionState.INCOMPLETE
        errors = [f"{v.vm_name}: {v.error}" for v in vms if v.error]
        async with self.parts.journal.change("session ended", session_id=self.sc.session_id) as db:
            row = await db.get(Session, self.sc.session_id)
            job = await db.get(Job, self.sc.job.job_id)
            if row is not None:
                row.state, row.ended_at = state, now()
                row.error = error or "; ".join(errors)
                # Recorded with the end state, so a crash before delivery still delivers it after restart.
                webhook = job is not None and job.has_webhook
                row.notification = Notification.PENDING if webhook else Notification.NONE
        self.parts.live.forget(self.sc.session_id)
        counters.session_ended(state)
        self.log.info(
            "session_ended",
            state=state.value,
            tasks={s.value: n for s in TaskState if (n := sum(1 for t in tasks if t.state is s))},
            restore_points=sum(1 for v in vms if v.restore_point_id),
        )
        return state


async def _delete_point(target: TargetClient, replica_path: str, point_id: str) -> None:
    try:
        await target.delete_point(replica_path, point_id)
    except grpc.aio.AioRpcError as e:
        if e.code() is not grpc.StatusCode.NOT_FOUND:  # NOT_FOUND: deleted before a crash
            raise


# What a target that could not be told does with the session's writes (the log line says it).
_NOT_TOLD = {
    True: "the replica stays between points; the session that resumes the held checkpoint continues it, any "
    "other session rolls it back first",
    False: "the replica stays between points until the next session's prepare rolls it back (no session resumes it)",
}


def _format_name(wire: common_pb2.DiskFormat.ValueType | None, asked: DiskFormat) -> str:
    for fmt in REPLICA_FORMATS:
        if wire == fmt.to_proto():
            return fmt.value
    return asked.value


# Disks whose prepare names the held session (resume_session_id): a resumed one continues its transfer; a
# done one (completed under the held checkpoint) is at its end already, and naming the session tells the
# target this session continues that session's replica, whose writes it must keep (a prepare that names no
# session it continues lets the target roll the replica back, and a done disk sends nothing to redo it).
# A disk that failed under the held checkpoint names none: its transfer is never continued.
_CONTINUES = (DiskStart.RESUME, DiskStart.DONE)


def held_checkpoint(job_id: str, vm_id: str) -> Select[Any]:
    """The checkpoint of a VM the job holds for disks left to resume (at most one: unique per job and VM)."""
    return select(HeldCheckpoint).where(HeldCheckpoint.job_id == job_id, HeldCheckpoint.vm_id == vm_id)


class VmRun:
    """One VM of the session, driven state by state (see states.VmState)."""

    # What runs each disk task; the reverse transfer of a failback (engine.reverse) runs its own.
    task_runner: type[TaskRunner] = TaskRunner

    def __init__(self, parts: EngineParts, sc: SessionContext, row_id: str) -> None:
        self.parts = parts
        self.sc = sc
        self.row_id = row_id
        self.checkpoint: Checkpoint | None = None
        self.log = log.bind(session_id=sc.session_id)

    async def _row(self) -> SessionVm:
        return await self.parts.journal.load(SessionVm, self.row_id)

    async def _tasks(self, row: SessionVm) -> list[Task]:
        async with self.parts.journal.read() as db:
            q = select(Task).where(Task.session_id == self.sc.session_id, Task.vm_id == row.vm_id)
            return list(await db.scalars(q.order_by(Task.disk_id)))

    async def _set(self, new: VmState, **values: object) -> None:
        async with self.parts.journal.change(f"vm {new}", session_id=self.sc.session_id, vm=self.row_id) as db:
            row = await db.get(SessionVm, self.row_id)
            if row is not None:
                row.state = new
                for k, v in values.items():
                    setattr(row, k, v)

    async def run(self) -> VmState:
        handlers: dict[VmState, Callable[[SessionVm], Awaitable[None]]] = {
            VmState.PLANNED: self._release_expired,
            VmState.CHECKPOINTING: self._take_checkpoint,
            VmState.TRANSFERRING: self._transfer,
            VmState.COMMITTING: self._commit,
            VmState.RELEASING: self._release,
            VmState.HOLDING: self._hold,
        }
        row = await self._row()
        self.log = self.log.bind(vm_id=row.vm_id, vm=row.vm_name)
        while True:
            while (state := row.state) not in FINAL_VM:
                try:
                    await handlers[state](row)
                except asyncio.CancelledError:
                    raise
                except ERRORS as e:
                    await self._failed(row, state, describe(e))
                row = await self._row()
            if not await self._retry(row):
                await self._end_replica_session(row)
                return row.state
            row = await self._row()

    async def _retry(self, row: SessionVm) -> bool:
        """A failed VM is tried again, after the job's wait, while retries are left and the session runs.
        The other VMs go on meanwhile. The retry takes a new checkpoint and runs every disk again, so
        the restore point is consistent; tasks get new transfer ids (see TaskRunner)."""
        if row.state is not VmState.FAILED or row.attempt > self.sc.job.retries or self.sc.stopping.is_set():
            return False
        if not await self._tasks(row):  # not found when planned: nothing to run again
            return False
        self.log.info("vm_retry_waiting", attempt=row.attempt + 1, wait=self.sc.job.retry_wait_seconds, error=row.error)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.sc.stopping.wait(), self.sc.job.retry_wait_seconds)
        if self.sc.stopping.is_set():
            return False
        async with self.parts.journal.change("vm retry", session_id=self.sc.session_id, vm=row.vm_id) as db:
            for t in await db.scalars(
                select(Task).where(Task.session_id == self.sc.session_id, Task.vm_id == row.vm_id)
            ):
                t.state, t.proxy_id, t.transfer_id, t.error = TaskState.PENDING, None, "", ""
                t.change_mode, t.since_reference, t.committed_offset, t.stats = "", "", 0, {}
                t.full_check = False
                t.start, t.resume_session_id, t.ended_at = DiskStart.FRESH.value, "", None
            vm = await db.get(SessionVm, row.id)
            if vm is not None:
                vm.state, vm.attempt = VmState.PLANNED, row.attempt + 1
                vm.checkpoint_id, vm.checkpoint_reference = "", ""
                # The attempt's reference, if it kept one, was dropped when it was released.
                vm.reference_kept, vm.reference_dropped = False, False
                vm.error = f"attempt {row.attempt}: {row.error}"
        return True

    async def _end_replica_session(self, row: SessionVm) -> None:
        """Tells the target how the VM's session ended when it made no restore point: keep its writes for the
        session that resumes the held checkpoint, or roll the replica back to its newest point now
        (states.replica_session_end). Called once the VM is final and will not be retried, and recorded
        after the call (idempotent on the target), so a controller killed before the record makes it again
        when it continues the session. A retry within the session tells nothing in between: its prepares
        are of the same session (a new checkpoint restarts each disk at offset 0), and the target's pending
        rollback data keeps each overwritten block as it was at the newest point, whichever attempt
        overwrote it; rolling back between attempts would only throw away what a digest comparison could
        have kept. A target that stays down is not waited for: the session still ends, and the target rolls
        the replica back at the next prepare that does not resume this session."""
        if row.replica_end is not ReplicaEnd.UNTOLD:
            return
        wrote = row.attempt > 1 or any(t.transfer_id for t in await self._tasks(row))
        keep = replica_session_end(row.state, wrote=wrote)
        if keep is None:
            return
        target = self.parts.agents.target(self.sc.target.address, self.sc.target.tls_server_name)
        request = target_pb2.EndReplicaSessionRequest(
            replica_path=self.sc.replica_path(row.vm_id), session_id=self.sc.session_id, keep_for_resume=keep
        )
        try:
            await self._retrying()(target.end_session, request, within=30)
            end = ReplicaEnd.KEPT if keep else ReplicaEnd.ROLLED_BACK
            self.log.info("replica_session_ended", keep_for_resume=keep)
        except grpc.aio.AioRpcError as e:
            if e.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND):
                # No writes of this session there (another session's kept, or no replica yet): none to end.
                end = ReplicaEnd.NOTHING
                self.log.info("replica_session_not_the_replicas", keep_for_resume=keep, reason=describe(e))
            else:
                end = ReplicaEnd.NOT_TOLD
                self.log.warning(
                    "replica_session_end_not_told",
                    keep_for_resume=keep,
                    error=describe(e),
                    consequence=_NOT_TOLD[keep],
                )
        async with self.parts.journal.change("replica session ended", vm=row.vm_id, end=end.value) as db:
            vm = await db.get(SessionVm, row.id)
            if vm is not None:
                vm.replica_end = end

    async def _failed(self, row: SessionVm, state: VmState, error: str) -> None:
        self.log.warning("vm_step_failed", step=state.value, error=error)
        if state in (VmState.PLANNED, VmState.CHECKPOINTING, VmState.RELEASING):
            await self._end_tasks(row, TaskState.FAILED, error)
            await self._set(VmState.FAILED, error=error)
        elif state is VmState.HOLDING:
            raise FailedPrecondition(f"cannot record the held checkpoint: {error}")
        else:  # no restore point this time; the checkpoint still goes
            await self._set(VmState.RELEASING, error=error)

    async def _end_tasks(self, row: SessionVm, state: TaskState, error: str) -> None:
        open_tasks = [t for t in await self._tasks(row) if t.state in (TaskState.PENDING, TaskState.STARTING)]
        if not open_tasks:
            return
        async with self.parts.journal.change(f"tasks {state}", session_id=self.sc.session_id, vm=row.vm_id) as db:
            for t in open_tasks:
                task = await db.get(Task, t.id)
                if task is not None:
                    task.state, task.error, task.ended_at = state, error, now()

    async def _release_expired(self, row: SessionVm) -> None:
        """A checkpoint held by an earlier session past its deadline goes before a new one is taken."""
        if self.sc.stopping.is_set():
            await self._end_tasks(row, TaskState.RESUMABLE, "stopped before a checkpoint was taken")
            await self._set(VmState.STOPPED)
            return
        async with self.parts.journal.read() as db:
            held: HeldCheckpoint | None = await db.scalar(held_checkpoint(self.sc.job.job_id, row.vm_id))
        if held is not None:
            await self.sc.provider.remove_checkpoint(row.vm_id, held.checkpoint_id)
            async with self.parts.journal.change("held checkpoint released", vm=row.vm_id) as db:
                await db.execute(delete(HeldCheckpoint).where(HeldCheckpoint.id == held.id))
            self.log.info("held_checkpoint_released", checkpoint_id=held.checkpoint_id, reason="deadline")
        await self._set(VmState.CHECKPOINTING)

    async def _take_checkpoint(self, row: SessionVm) -> None:
        # A crash between creating a checkpoint and recording it leaves an orphan: ours (providers list only
        # checkpoints vmrepl made) and used by no one, so it goes before the new one is taken. A checkpoint
        # another session (another job on this VM) is reading is no orphan: removing it would merge writes
        # made after it into the disk under that session's transfer. One lock per VM id orders the scan,
        # the creation and its record against other sessions of this controller.
        async with self.parts.checkpoint_lock(row.vm_id):
            in_use = await self._checkpoints_in_use(row)
            for orphan in await self.sc.provider.list_checkpoints(row.vm_id):
                if orphan.checkpoint_id in in_use:
                    raise FailedPrecondition(
                        f"VM {row.vm_name} has checkpoint {orphan.checkpoint_id} of {in_use[orphan.checkpoint_id]}:"
                        " one job at a time replicates a VM, try again when it has ended"
                    )
                self.log.info("orphan_checkpoint_removed", checkpoint_id=orphan.checkpoint_id)
                await self.sc.provider.remove_checkpoint(row.vm_id, orphan.checkpoint_id)
            vm = await self.sc.provider.get_vm(row.vm_id)
            # Captured just before the checkpoint, so a failure here leaves no checkpoint behind.
            config = await self._configuration(row)
            quiesced = await self.parts.guest.before_checkpoint(vm, self.sc.job.guest_processing)
            cp = await self.sc.provider.create_checkpoint(row.vm_id, checkpoint_request(self.sc.job.guest_processing))
            await self.parts.guest.after_checkpoint(vm, self.sc.job.guest_processing)
            self.checkpoint = cp
            consistency = Consistency.APPLICATION if quiesced else cp.consistency
            await self._set(
                VmState.TRANSFERRING,
                checkpoint_id=cp.checkpoint_id,
                checkpoint_reference=cp.reference,
                consistency=consistency.value,
                consistency_fallback="" if quiesced else cp.fallback_reason,
                vm_configuration=config,
            )
        self.log.info(
            "checkpoint_created",
            checkpoint_id=cp.checkpoint_id,
            reference=cp.reference,
            consistency=consistency.value,
            consistency_fallback=cp.fallback_reason or None,
        )

    async def _configuration(self, row: SessionVm) -> bytes:
        """The VM's configuration, kept with the restore point (what failover registers the replica VM with)."""
        config = await self.sc.provider.vm_configuration(row.vm_id)
        if len(config) > MAX_VM_CONFIGURATION:
            raise FailedPrecondition(
                f"VM {row.vm_name}: its configuration is {len(config)} bytes, over the {MAX_VM_CONFIGURATION} kept "
                "with a restore point"
            )
        return config

    async def _checkpoints_in_use(self, row: SessionVm) -> dict[str, str]:
        """The VM's checkpoints held for a resume or being read by a session that runs: id -> by whom."""
        reading = (
            select(SessionVm.checkpoint_id, Job.name)
            .join(Session, Session.id == SessionVm.session_id)
            .join(Job, Job.id == Session.job_id)
            .where(
                SessionVm.vm_id == row.vm_id,
                SessionVm.id != row.id,
                SessionVm.checkpoint_id != "",
                SessionVm.state.not_in(FINAL_VM),
                Session.state.in_(ACTIVE_SESSION),
            )
        )
        held = select(HeldCheckpoint.checkpoint_id, Job.name).join(Job, Job.id == HeldCheckpoint.job_id)
        async with self.parts.journal.read() as db:
            out = {cp: f"a running session of job {name}" for cp, name in (await db.execute(reading)).all()}
            rows = (await db.execute(held.where(HeldCheckpoint.vm_id == row.vm_id))).all()
            out.update({cp: f"job {name} (held for a resume)" for cp, name in rows})
        return out

    async def _find_checkpoint(self, row: SessionVm) -> Checkpoint:
        if self.checkpoint is not None and self.checkpoint.checkpoint_id == row.checkpoint_id:
            return self.checkpoint
        for cp in await self.sc.provider.list_checkpoints(row.vm_id):
            if cp.checkpoint_id == row.checkpoint_id:
                self.checkpoint = cp
                return cp
        raise NotFound(f"checkpoint {row.checkpoint_id} of VM {row.vm_name} no longer exists")

    async def _transfer(self, row: SessionVm) -> None:
        try:
            cp = await self._find_checkpoint(row)
        except NotFound as e:
            await self._end_tasks(row, TaskState.FAILED, str(e))
            raise
        tasks = await self._tasks(row)
        runners = (self.task_runner(self.parts, self.sc, cp, t.id, attempt=row.attempt).run() for t in tasks)
        ends = await asyncio.gather(*runners)
        await self._set(vm_after_transfers(ends))

    def _retrying(self) -> AsyncRetrying:
        """Target calls that find the target out of reach (restarting) are asked again for a while."""
        return AsyncRetrying(
            retry=retry_if_exception(transient),
            stop=stop_after_delay(self.parts.target_retry_seconds),
            wait=wait_exponential(multiplier=0.2, max=2.0),
            reraise=True,
        )

    async def _commit(self, row: SessionVm) -> None:
        target = self.parts.agents.target(self.sc.target.address, self.sc.target.tls_server_name)
        replica_path = self.sc.replica_path(row.vm_id)
        tasks = await self._tasks(row)
        if not row.reference_kept:
            row = await self._keep_reference(row)
        request = target_pb2.CommitRestorePointRequest(
            replica_path=replica_path,
            session_id=self.sc.session_id,
            checkpoint_id=row.checkpoint_id,
            disk_ids=[t.disk_id for t in tasks],
            change_reference=row.checkpoint_reference,
            consistency=Consistency(row.consistency).to_proto(),
            vm_configuration=row.vm_configuration or b"",
        )
        # A target restarting under the call may have committed the point before it went: asked again, it
        # answers with the same point (idempotent per session and checkpoint), so none is left unrecorded.
        point: target_pb2.RestorePoint = await self._retrying()(target.commit, request, within=30)
        async with self.parts.journal.change("restore point committed", vm=row.vm_id, point=point.id) as db:
            if await db.get(RestorePoint, point.id) is None:  # a retried commit returns the same point
                db.add(self._point_row(row, point, tasks))
            vm = await db.get(SessionVm, row.id)
            if vm is not None:
                vm.restore_point_id = point.id
        self.log.info("restore_point_committed", restore_point_id=point.id)
        await self._apply_retention(row, replica_path)
        await self._drop_references(row.vm_id, keep=row.checkpoint_reference)
        await self._set(VmState.RELEASING)

    async def _drop_references(self, vm_id: str, *, keep: str) -> None:
        """The change-tracking references this job kept for the VM, but `keep`: dropped once the point naming
        `keep` is committed, never before (an older one is what the next incremental would need otherwise).
        Only references this job made are dropped (another tool's reference points are never touched); a
        rollback to an older point then compares digests, with the reason shown."""
        mine = (
            select(SessionVm)
            .join(Session, Session.id == SessionVm.session_id)
            .where(
                Session.job_id == self.sc.job.job_id,
                SessionVm.vm_id == vm_id,
                SessionVm.reference_kept.is_(True),
                SessionVm.reference_dropped.is_(False),
                SessionVm.checkpoint_reference != keep,
            )
        )
        async with self.parts.journal.read() as db:
            rows = list(await db.scalars(mine))
        for old in rows:
            await self.sc.provider.drop_reference(vm_id, old.checkpoint_reference)
            async with self.parts.journal.change("change reference dropped", vm=vm_id) as db:
                found = await db.get(SessionVm, old.id)
                if found is not None:
                    found.reference_dropped = True
            self.log.info("change_reference_dropped", reference=old.checkpoint_reference, session=old.session_id)

    async def _keep_reference(self, row: SessionVm) -> SessionVm:
        """Every disk was read from the checkpoint: the provider keeps the reference later sessions ask changes
        against, before the point that names it is committed (Hyper-V: ConvertToReferencePoint, which removes
        the checkpoint, so this runs once, recorded). A controller killed inside the call finds the checkpoint
        gone when it continues: the VM fails and its retry takes a new one; the reference the lost call made is
        not the job's to find (Hyper-V reference points carry no name), and holds no data."""
        kept = await self.sc.provider.keep_reference(await self._checkpoint_kept(row))
        await self._set(VmState.COMMITTING, checkpoint_reference=kept.reference, reference_kept=True)
        self.log.info("change_reference_kept", reference=kept.reference, checkpoint_removed=kept.checkpoint_removed)
        return await self._row()

    def _point_row(self, row: SessionVm, point: target_pb2.RestorePoint, tasks: list[Task]) -> RestorePoint:
        """The point as the database keeps it: its disks are the VM's tasks (sizes checked against the
        target's replica when each completed), in the format the target reports (the one asked for when
        it reports none)."""
        formats = {d.disk_id: d.format for d in point.disks}
        disks = [
            {
                "disk_id": t.disk_id,
                "disk_size": t.disk_size,
                "format": _format_name(formats.get(t.disk_id), self.sc.job.replica_format),
            }
            for t in tasks
        ]
        return RestorePoint(
            id=point.id,
            job_id=self.sc.job.job_id,
            vm_id=row.vm_id,
            vm_name=row.vm_name,
            session_id=self.sc.session_id,
            created_at=point.created_at.ToDatetime(dt.UTC),
            reference=row.checkpoint_reference,
            size_bytes=sum(t.disk_size for t in tasks),
            consistency=row.consistency,
            disks=disks,
            vm_configuration=row.vm_configuration,
        )

    async def _checkpoint_kept(self, row: SessionVm) -> Checkpoint:
        """The checkpoint the disks were read from, as the host lists it now. If it is gone (removed by someone
        else meanwhile, its overlay merged into the disks under the transfer), what was read is no consistent
        image. Always asked of the host: a cached one says nothing about now."""
        for cp in await self.sc.provider.list_checkpoints(row.vm_id):
            if cp.checkpoint_id == row.checkpoint_id:
                return cp
        raise FailedPrecondition(
            f"checkpoint {row.checkpoint_id} of VM {row.vm_name} was removed while its disks were read: "
            "no restore point is made from them"
        )

    async def _apply_retention(self, row: SessionVm, replica_path: str) -> None:
        async with self.parts.journal.read() as db:
            points = list(
                await db.scalars(
                    select(RestorePoint).where(
                        RestorePoint.job_id == self.sc.job.job_id, RestorePoint.vm_id == row.vm_id
                    )
                )
            )
            held = await held_points(db, self.sc.job.job_id, row.vm_id)  # failed over to, or under a test failover
        target = self.parts.agents.target(self.sc.target.address, self.sc.target.tls_server_name)
        await self._delete_orphans(target, replica_path, {p.id for p in points})
        kept = self.sc.job.restore_points_to_keep
        for point_id in points_to_delete([(p.id, p.created_at) for p in points if p.id not in held], kept):
            await _delete_point(target, replica_path, point_id)
            async with self.parts.journal.change("restore point deleted", vm=row.vm_id, point=point_id) as db:
                await db.execute(delete(RestorePoint).where(RestorePoint.id == point_id))
            self.log.info("restore_point_deleted", restore_point_id=point_id, reason="retention")

    async def _delete_orphans(self, target: TargetClient, replica_path: str, known: set[str]) -> None:
        """Points on the target the database does not know: committed by a call whose answer was lost
        (the target went down under it) before the VM failed. The replica path is this job's alone."""
        for p in await target.list_points(replica_path):
            if p.id in known:
                continue
            await _delete_point(target, replica_path, p.id)
            self.log.info("restore_point_deleted", restore_point_id=p.id, session=p.session_id, reason="orphan")

    async def _release(self, row: SessionVm) -> None:
        if row.checkpoint_id:  # idempotent: also after keep_reference removed it
            await self.sc.provider.remove_checkpoint(row.vm_id, row.checkpoint_id)
            self.log.info("checkpoint_removed", checkpoint_id=row.checkpoint_id)
        final = VmState.DONE if row.restore_point_id else VmState.FAILED
        if final is VmState.FAILED and row.reference_kept and not row.reference_dropped:
            # Kept for a point that was never committed: no session will ask changes against it.
            await self.sc.provider.drop_reference(row.vm_id, row.checkpoint_reference)
            await self._set(VmState.RELEASING, reference_dropped=True)
        error = row.error
        if final is VmState.FAILED and not error:
            failed = [t for t in await self._tasks(row) if t.state is TaskState.FAILED]
            error = "; ".join(f"disk {t.disk_id}: {t.error}" for t in failed) or "no restore point"
        async with self.parts.journal.change(f"vm {final}", vm=row.vm_id) as db:
            await db.execute(
                delete(HeldCheckpoint).where(
                    HeldCheckpoint.job_id == self.sc.job.job_id,
                    HeldCheckpoint.vm_id == row.vm_id,
                    HeldCheckpoint.checkpoint_id == row.checkpoint_id,
                )
            )
            vm = await db.get(SessionVm, row.id)
            if vm is not None:
                vm.state, vm.error = final, error

    async def _hold(self, row: SessionVm) -> None:
        deadline = now() + dt.timedelta(seconds=self.sc.job.checkpoint_hold_seconds)
        started = any(t.transfer_id for t in await self._tasks(row))
        async with self.parts.journal.change("vm held", vm=row.vm_id) as db:
            held: HeldCheckpoint | None = await db.scalar(held_checkpoint(self.sc.job.job_id, row.vm_id))
            if held is None:
                db.add(
                    HeldCheckpoint(
                        job_id=self.sc.job.job_id,
                        vm_id=row.vm_id,
                        checkpoint_id=row.checkpoint_id,
                        reference=row.checkpoint_reference,
                        session_id=self.sc.session_id,
                        deadline=deadline,
                        consistency=row.consistency,
                    )
                )
            elif held.checkpoint_id != row.checkpoint_id:
                held.checkpoint_id, held.reference = row.checkpoint_id, row.checkpoint_reference
                held.session_id, held.deadline, held.consistency = self.sc.session_id, deadline, row.consistency
            elif started:  # the same checkpoint held again: the deadline runs from when it was first held
                held.session_id = self.sc.session_id
            # else: this session started no disk of it (stopped first), so the target keeps the writes of the
            # session that did: the next one resumes that one (resume_session_id), or the target rolls back.
            vm = await db.get(SessionVm, row.id)
            if vm is not None:
                vm.state = VmState.HELD
        self.log.info("checkpoint_held", checkpoint_id=row.checkpoint_id)
