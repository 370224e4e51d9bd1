"""One disk task inside a session (its states in the database): decide its change source, take slots,
start the transfer (engine.transfer) and follow it.

Every state is written before the call it announces: STARTING (with the
proxy, the transfer id and the change source) before StartDiskTransfer,
RUNNING once the proxy has it. After a controller crash `run_task` is simply
called again: a transfer the proxy still knows (by its controller-chosen
id, the task's id) is watched again; otherwise it is started again and the
target resumes it from what it made durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Sequence

import grpc
from sqlalchemy import select
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_exponential

from controller.db.enums import TaskState
from controller.db.models import HeldCheckpoint, Proxy, RestorePoint, Session, SessionVm, Task, now
from controller.engine import counters
from controller.engine.agents import ProxyClient
from controller.engine.placement import ProxySlot
from controller.engine.runtime import EngineParts, SessionContext
from controller.engine.slots import NoProxy
from controller.engine.states import (
    TERMINAL_TASK,
    ChangeChoice,
    DiskStart,
    Recovery,
    check_task_transition,
    choose_change,
    full_check_due,
    reconcile_task,
)
from controller.engine.transfer import DiskTaskSpec, prepare, proxy_identity, start_request, trusted_change
from vmrepl.domain import TRANSFER_ENDED, ChangeMode, ChangeTracking, compare_digests, full_read, unreachable
from vmrepl.errors import FailedPrecondition, VmreplError
from vmrepl.extent import Extent
from vmrepl.logs import get_logger
from vmrepl.progress import TransferFigures
from vmrepl.providers.base import Checkpoint, Untracked
from vmrepl.v1 import common_pb2, proxy_pb2

log = get_logger("vmrepl.controller.engine.task")


class ProxyLost(Exception):
    """The proxy no longer knows the transfer (it restarted): start it again."""


def transient(e: BaseException) -> bool:
    """An agent call that failed because the agent is (for now) out of reach: worth asking again."""
    return isinstance(e, grpc.aio.AioRpcError) and unreachable(e.code())


def compared_every_block(tasks: Sequence[Task]) -> bool:
    """Whether a VM's session read or compared every block of every disk (a full read, a digest comparison, or
    a changed-range pass re-run as one after its sample differed): what a full check would have done."""
    whole = (ChangeMode.FULL.value, ChangeMode.COMPARE.value)
    return bool(tasks) and all(t.change_mode in whole or TransferFigures.from_json(t.stats).passes >= 2 for t in tasks)


class TaskRunner:
    def __init__(
        self, parts: EngineParts, sc: SessionContext, checkpoint: Checkpoint, task_id: str, *, attempt: int = 1
    ) -> None:
        self.parts = parts
        # A VM's retry runs its tasks again: a new transfer id, as the proxy remembers the failed one.
        self.transfer_id = task_id if attempt == 1 else f"{task_id}-{attempt}"
        self.sc = sc
        self.checkpoint = checkpoint
        self.task_id = task_id
        self.log = log.bind(session_id=sc.session_id, task_id=task_id)

    async def _task(self) -> Task:
        return await self.parts.journal.load(Task, self.task_id)

    async def _set(self, new: TaskState, what: str, **values: object) -> Task:
        async with self.parts.journal.change(what, session_id=self.sc.session_id, task_id=self.task_id) as db:
            task = await db.get(Task, self.task_id)
            if task is None:
                raise FailedPrecondition(f"task {self.task_id} vanished from the database")
            task.state = check_task_transition(task.state, new)
            for k, v in values.items():
                setattr(task, k, v)
            if new in TERMINAL_TASK:
                task.ended_at = now()
        return task

    async def run(self) -> TaskState:
        task = await self._task()
        if task.state in TERMINAL_TASK:
            return task.state
        self.log = self.log.bind(vm_id=task.vm_id, disk_id=task.disk_id)
        try:
            final = await self._drive(task)
            if final.state == proxy_pb2.TRANSFER_STATE_COMPLETED:
                await self._check_committed_size(task)
        except asyncio.CancelledError:
            raise
        except (VmreplError, grpc.aio.AioRpcError) as e:
            message = e.details() if isinstance(e, grpc.aio.AioRpcError) else str(e)
            self.log.warning("task_failed", error=message)
            task = await self._task()
            started = task.state in (TaskState.STARTING, TaskState.RUNNING)
            # A disk already streaming stays resumable when its proxy is gone (none answers, or the watch
            # kept failing to connect): the target keeps what it made durable. One never started failed.
            gone = isinstance(e, NoProxy) or transient(e)
            end = TaskState.RESUMABLE if gone and started else TaskState.FAILED
            await self._set(end, f"task {end}", error=message)
            return end
        return await self._finish(final)

    async def _check_committed_size(self, task: Task) -> None:
        """A disk is done only if the replica the target committed has the size planned: another size means
        the checkpoint showed another disk than the one planned (resized since, or another VM's)."""
        target = self.parts.agents.target(self.sc.target.address, self.sc.target.tls_server_name)
        replica = await target.get_disk(self.sc.replica_path(task.vm_id), task.disk_id)
        if replica.disk_size != task.disk_size:
            raise FailedPrecondition(
                f"disk {task.disk_id}: the replica's committed size {replica.disk_size} differs from the size "
                f"planned, {task.disk_size}"
            )

    async def _drive(self, task: Task) -> proxy_pb2.TransferProgress:
        state = task.state
        if state in (TaskState.STARTING, TaskState.RUNNING) and task.proxy_id:
            proxy = await self._proxy_row(task.proxy_id)
            knows = await self._proxy_knows(proxy, task.transfer_id) if proxy else None
            if proxy and reconcile_task(state, proxy_knows_transfer=knows) is Recovery.REATTACH:
                self.parts.slots.claim(proxy.id, self.sc.target.target_id)
                self.log.info("task_reattached", proxy=proxy.name, transfer_id=task.transfer_id)
                try:
                    if state is TaskState.STARTING:  # the start reached the proxy before the crash
                        await self._set(TaskState.RUNNING, "task running")
                    return await self._follow(proxy, task.transfer_id)
                except ProxyLost:
                    pass
                finally:
                    await self.parts.slots.release(proxy.id, self.sc.target.target_id)
        while True:
            if self.sc.stopping.is_set():
                return proxy_pb2.TransferProgress(state=proxy_pb2.TRANSFER_STATE_CANCELLED)
            slot = await self.parts.slots.acquire(
                self._proxy_slots,
                host_id=self.sc.job.host_id,
                target_id=self.sc.target.target_id,
                target_max=self.sc.target.max_tasks,
                session_id=self.sc.session_id,
            )
            try:
                proxy = await self._proxy_row(slot.proxy_id)
                if proxy is None:
                    continue
                return await self._start(proxy)
            except ProxyLost:
                continue
            finally:
                await self.parts.slots.release(slot.proxy_id, self.sc.target.target_id)

    async def _start(self, proxy: Proxy) -> proxy_pb2.TransferProgress:
        task = await self._task()
        choice = await self._change_choice(task)
        change = await self._change_source(task, choice)
        if change is None:  # the tracker cannot say: compare digests (no full check then), and record it
            choice = ChangeChoice(ChangeMode.COMPARE)
            change = compare_digests()
        task = await self._set(
            TaskState.STARTING,
            "task starting",
            proxy_id=proxy.id,
            transfer_id=self.transfer_id,
            change_mode=choice.mode.value,
            since_reference=choice.since,
            full_check=choice.full_check,
            started_at=task.started_at or now(),
        )
        spec = self._spec(task, change, ticket_expires=await self._checkpoint_deadline(task.vm_id))
        disk = await prepare(self.parts.agents.target(self.sc.target.address, self.sc.target.tls_server_name), spec)
        if trusted_change(change, disk) is not change:
            # A transfer from this checkpoint failed sampled verification: its changed ranges lost writes.
            self.log.warning("change_tracking_failed_before", since=choice.since, fallback=ChangeMode.COMPARE.value)
            choice = ChangeChoice(ChangeMode.COMPARE)
            spec = dataclasses.replace(spec, change_source=compare_digests())
            await self.parts.journal.note(Task, self.task_id, change_mode=choice.mode.value, since_reference="")
        self.log.info(
            "task_starting",
            proxy=proxy.name,
            change=choice.mode.value,
            since=choice.since,
            resume_offset=disk.committed_offset,
            full_check=choice.full_check or None,
        )
        client = self.parts.agents.proxy(proxy.address, proxy.tls_server_name)
        request = start_request(
            spec,
            target_address=self.sc.target.address,
            signing_key=self.parts.signing_key,
            proxy=await proxy_identity(client),
        )
        request.target.tls_server_name = self.sc.target.tls_server_name
        await client.start(request)
        await self._set(TaskState.RUNNING, "task running")
        return await self._follow(proxy, self.transfer_id)

    async def _checkpoint_deadline(self, vm_id: str) -> float:
        """When the checkpoint stops being held, so tickets for reading it expire then at the latest."""
        async with self.parts.journal.read() as db:
            held = await db.scalar(
                select(HeldCheckpoint).where(
                    HeldCheckpoint.job_id == self.sc.job.job_id,
                    HeldCheckpoint.vm_id == vm_id,
                    HeldCheckpoint.checkpoint_id == self.checkpoint.checkpoint_id,
                )
            )
        if held is not None:
            return held.deadline.timestamp()
        return self.checkpoint.created_at + self.sc.job.checkpoint_hold_seconds

    def _spec(self, task: Task, change: proxy_pb2.ChangeSource, *, ticket_expires: float) -> DiskTaskSpec:
        disk = self.checkpoint.disk(task.disk_id)
        job = self.sc.job
        return DiskTaskSpec(
            session_id=self.sc.session_id,
            checkpoint_id=self.checkpoint.checkpoint_id,
            ticket_expires=ticket_expires,
            disk_id=task.disk_id,
            source_locator=disk.locator,
            source_format=disk.format,
            disk_size=disk.size,
            replica_path=self.sc.replica_path(task.vm_id),
            block_size=job.block_size,
            change_source=change,
            compression=job.compression,
            bandwidth_limit_mbps=job.bandwidth_limit_mbps,
            target_name=self.sc.target.name,
            transfer_id=self.transfer_id,
            resume_session_id=task.resume_session_id,
            replica_format=job.replica_format,
        )

    async def _change_choice(self, task: Task) -> ChangeChoice:
        if task.change_mode:  # decided before a crash or a lost proxy: the very same source again
            return ChangeChoice(ChangeMode(task.change_mode), task.since_reference, full_check=task.full_check)
        if task.start == DiskStart.RESUME and task.resume_session_id:
            async with self.parts.journal.read() as db:
                earlier = await db.scalar(
                    select(Task).where(
                        Task.session_id == task.resume_session_id,
                        Task.vm_id == task.vm_id,
                        Task.disk_id == task.disk_id,
                    )
                )
            if earlier is not None and earlier.change_mode:
                mode = ChangeMode(earlier.change_mode)
                return ChangeChoice(mode, earlier.since_reference, full_check=earlier.full_check)
        return choose_change(
            DiskStart(task.start),
            tracking=self.sc.job.change_tracking,
            last_point_reference=await self._last_point_reference(task.vm_id),
            checkpoint_reference=self.checkpoint.reference,
            full_check=await self._full_check_due(task.vm_id),
        )

    async def _full_check_due(self, vm_id: str) -> bool:
        """Whether this session's incremental of the VM is a full check: asked for, or due by the count of the
        VM's sessions (of this job, with a restore point) since one compared every block. The history only
        changes when this VM commits a point, after all its tasks, so each of its disks gets the same answer."""
        every, requested = self.sc.job.full_check_every, self.sc.full_check
        if requested or every <= 1:
            return full_check_due(every=every, requested=requested, recent=[])
        async with self.parts.journal.read() as db:
            sessions = list(
                await db.scalars(
                    select(SessionVm.session_id)
                    .join(Session, Session.id == SessionVm.session_id)
                    .where(
                        Session.job_id == self.sc.job.job_id,
                        Session.id != self.sc.session_id,
                        SessionVm.vm_id == vm_id,
                        SessionVm.restore_point_id != "",
                    )
                    .order_by(Session.started_at.desc(), Session.id.desc())
                    .limit(every - 1)
                )
            )
            tasks = list(await db.scalars(select(Task).where(Task.session_id.in_(sessions), Task.vm_id == vm_id)))
        recent = [compared_every_block([t for t in tasks if t.session_id == s]) for s in sessions]
        return full_check_due(every=every, requested=False, recent=recent)

    async def _last_point_reference(self, vm_id: str) -> str | None:
        """The change-tracking reference of the VM's newest restore point in this job; None without one."""
        async with self.parts.journal.read() as db:
            point = await db.scalar(
                select(RestorePoint)
                .where(RestorePoint.job_id == self.sc.job.job_id, RestorePoint.vm_id == vm_id)
                .order_by(RestorePoint.created_at.desc(), RestorePoint.id.desc())
                .limit(1)
            )
        return None if point is None else point.reference

    async def _change_source(self, task: Task, choice: ChangeChoice) -> proxy_pb2.ChangeSource | None:
        """The ChangeSource of the choice; None when the host cannot report the changed ranges it needs.

        A full check asks the host for the changed ranges all the same (the call a changed-range incremental
        makes) and hands them to the proxy, which compares every block and reports the differing blocks those
        ranges do not name: the writes the change tracking missed, repaired by this check."""
        if choice.mode is ChangeMode.FULL:
            return full_read()
        if choice.mode is ChangeMode.COMPARE and not choice.full_check:
            return compare_digests()
        if choice.since == self.checkpoint.reference:
            # A disk done under this very checkpoint (DiskStart.DONE): nothing changed since it, by definition.
            # Hyper-V has no reference for a checkpoint until it is converted, so the host is not asked.
            ranges: list[Extent] | Untracked = []
        else:
            ranges = await self.sc.provider.changed_ranges(self.checkpoint, task.disk_id, choice.since)
        if isinstance(ranges, Untracked):
            # A full check compares every block anyway (the host's ranges only tell repairs from changes): it
            # goes on without them, so `job start --full-check` brings a job that requires change tracking
            # back to a replica with a fresh reference after the host lost its reference.
            if self.sc.job.change_tracking is ChangeTracking.ON and not choice.full_check:
                raise FailedPrecondition(
                    f"change tracking is required by the job but the host cannot report changes of disk "
                    f"{task.disk_id}: {ranges.reason}"
                )
            self.log.info("change_tracking_unavailable", reason=ranges.reason, fallback=ChangeMode.COMPARE.value)
            await self.parts.journal.note(Task, self.task_id, fallback_reason=ranges.reason)
            return None
        byte_ranges = [common_pb2.ByteRange(offset=e.offset, length=e.length) for e in ranges]
        changed = proxy_pb2.ChangedRanges(ranges=byte_ranges, reference_id=choice.since)
        if choice.full_check:
            return proxy_pb2.ChangeSource(compare_digests=proxy_pb2.CompareDigests(full_check=changed))
        return proxy_pb2.ChangeSource(changed_ranges=changed)

    async def _follow(self, proxy: Proxy, transfer_id: str) -> proxy_pb2.TransferProgress:
        """Watch the transfer to its end, cancelling it if the session stops; retries a broken watch."""
        client = self.parts.agents.proxy(proxy.address, proxy.tls_server_name)
        canceller = asyncio.create_task(self._cancel_on_stop(client, transfer_id))
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception(transient),
                wait=wait_exponential(multiplier=0.5, max=5),
                stop=stop_after_delay(self.parts.proxy_lost_after),
                reraise=True,
            ):
                with attempt:
                    return await self._watch(client, transfer_id)
        except grpc.aio.AioRpcError as e:
            if not transient(e):
                raise
            # The proxy stayed unreachable: start the disk again on a proxy that answers (the target keeps
            # what it made durable, so it resumes); with none, the disk is left resumable.
            self.log.warning("proxy_lost", proxy=proxy.name, transfer_id=transfer_id, error=e.code().name)
            raise ProxyLost(transfer_id) from e
        finally:
            canceller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await canceller
        raise AssertionError("unreachable: AsyncRetrying returns or raises")

    async def _watch(self, client: ProxyClient, transfer_id: str) -> proxy_pb2.TransferProgress:
        last: proxy_pb2.TransferProgress | None = None
        seen_progress = 0.0
        try:
            async with contextlib.aclosing(client.watch(transfer_id)) as progresses:
                async for p in progresses:
                    last = p
                    self.parts.live.update(self.sc.session_id, self.task_id, p)
                    if p.elapsed_seconds - seen_progress >= 2.0:  # progress figures, not a state change
                        seen_progress = p.elapsed_seconds
                        await self.parts.journal.note(
                            Task,
                            self.task_id,
                            committed_offset=p.committed_offset,
                            stats=TransferFigures.from_progress(p).to_json(),
                        )
        except grpc.aio.AioRpcError as e:
            if e.code() is grpc.StatusCode.NOT_FOUND:
                raise ProxyLost(transfer_id) from e
            raise
        if last is None or last.state not in TRANSFER_ENDED:
            raise ProxyLost(transfer_id)  # the stream ended without a final state: the proxy went away
        return last

    async def _cancel_on_stop(self, client: ProxyClient, transfer_id: str) -> None:
        await self.sc.stopping.wait()
        self.log.info("task_cancelling", transfer_id=transfer_id)
        with contextlib.suppress(grpc.aio.AioRpcError):
            await client.cancel(transfer_id)

    async def _finish(self, final: proxy_pb2.TransferProgress) -> TaskState:
        figures = TransferFigures.from_progress(final)
        if final.state == proxy_pb2.TRANSFER_STATE_COMPLETED:
            end, error = TaskState.SUCCEEDED, ""
        elif final.state == proxy_pb2.TRANSFER_STATE_CANCELLED:
            end, error = TaskState.RESUMABLE, "stopped"
        else:
            end, error = TaskState.FAILED, f"{final.error_code}: {final.error_message}".strip(": ")
        await self._set(
            end, f"task {end}", committed_offset=final.committed_offset, stats=figures.to_json(), error=error
        )
        counters.task_ended(end, final)
        self.log.info(
            "task_ended",
            state=end.value,
            committed_offset=final.committed_offset,
            passes=figures.passes,
            verification=figures.verification or None,
            blocks_repaired=figures.full_check.repaired_blocks if figures.full_check else None,
            repaired_ranges=figures.full_check.repaired_ranges if figures.full_check else None,
            error=error,
        )
        return end

    async def _proxy_row(self, proxy_id: str) -> Proxy | None:
        async with self.parts.journal.read() as db:
            return await db.get(Proxy, proxy_id)

    async def _proxy_knows(self, proxy: Proxy, transfer_id: str) -> bool | None:
        client = self.parts.agents.proxy(proxy.address, proxy.tls_server_name)
        try:
            async with contextlib.aclosing(client.watch(transfer_id, within=10)) as progresses:
                async for _ in progresses:
                    return True
            return True
        except grpc.aio.AioRpcError as e:
            return False if e.code() is grpc.StatusCode.NOT_FOUND else None

    async def _proxy_slots(self) -> Sequence[ProxySlot]:
        async with self.parts.journal.read() as db:
            proxies = list(await db.scalars(select(Proxy).order_by(Proxy.name)))
        health = await asyncio.gather(
            *(self.parts.agents.proxy(p.address, p.tls_server_name).healthy() for p in proxies)
        )
        return [
            ProxySlot(p.id, p.name, ok, p.max_tasks, 0, frozenset(str(h) for h in p.host_ids))
            for p, ok in zip(proxies, health, strict=True)
        ]
