"""The transfer in reverse, for failback: one VM's disks from the failover host back onto the original's.

A failback writes the failed-over VM's data back onto the original VM's disks. The target agent next to the
original host readies each original disk first (PrepareFailbackDisk: a replica disk under `replica_path`,
`.failback/<job id>/<vm id>`, whose data file is a hard link of the original image, its digests computed
from the original's content, with a restore point standing for "the original as it was"). This module then
runs the session machinery of a replication (VmRun, TaskRunner) unchanged, only pointed the other way:

* the source is the failed-over VM on the failover host: a checkpoint of it is taken and each disk is read
  from it by a proxy (those naming the failover host preferred), through the disk-reader factory (a file
  host's failed-over disks are `layer` disks);
* the target is the failback target, the replica path the failback folder, each disk in the format its
  failback disk has (the original's; formats are never converted);
* the change mode is always a digest comparison: only blocks whose digests differ from the original's
  travel, whatever the job's change tracking says (the failed-over VM was written outside it);
* the VM's row and its disk tasks are recorded under the operation's session, so its statistics and log show
  what travelled; the restore point is committed on the failback folder only: no restore point row of the
  job, no retention, no change-tracking reference kept or dropped.

The target saves each original block before overwriting it, so a failback cut short is continued (after a
controller restart the same call continues from the recorded states, as a session does) or rolled back: a
VM that ends without a point has its writes rolled back by the target (EndReplicaSession), and disks left
resumable are not held for a later session (none would continue them).

Two levels:

* `run_reverse(parts, ReverseRun(...)) -> ReverseResult`: the transfer itself, on failback disks already
  readied. Refusals before anything is recorded (a disk not readied, a disk set, size or block size that
  differs) raise FailedPrecondition; an agent that cannot be asked, the relayed error
  (controller.engine.agents.relayed). Once the VM's row is written, the outcome is in the result: its state,
  the point committed, per disk bytes read, sent and the blocks that differed.
* `FailbackTransfers(parts)`: what the failback step calls (controller.engine.operations.context's
  ReverseTransfer protocol): `transfer` readies the disks (PrepareFailbackDisk), runs the transfer and
  commits it, raising unless it succeeded; `roll_back` ends a transfer still under way (its proxies
  cancelled, its checkpoint removed), RollbackReplica, DeleteReplica; `finish` DeleteReplica.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from dataclasses import dataclass, field

import grpc
from sqlalchemy import select
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_exponential

from controller.db.enums import TaskState, VmState
from controller.db.models import Job, SessionVm, Task
from controller.engine.agents import TargetClient, relayed
from controller.engine.operations.context import ReverseFigures, ReverseRequest
from controller.engine.runtime import EngineParts, JobView, SessionContext, TargetView
from controller.engine.session import VmRun
from controller.engine.sessions import job_view
from controller.engine.states import FINAL_VM, ChangeChoice
from controller.engine.task import TaskRunner, transient
from controller.engine.transfer import DiskTaskSpec
from vmrepl.domain import ChangeMode, ChangeTracking, Consistency, DiskFormat
from vmrepl.errors import FailedPrecondition, NotFound
from vmrepl.logs import get_logger
from vmrepl.progress import TransferFigures
from vmrepl.providers.base import Provider, VmInfo
from vmrepl.v1 import common_pb2, proxy_pb2, target_pb2

log = get_logger("vmrepl.controller.engine.reverse")


@dataclass(frozen=True, kw_only=True)
class ReverseRun:
    """What the failback step asks for."""

    # The operation's session: the VM's row and its disk tasks are recorded under it.
    session_id: str
    # The job's settings as the operation read them (compression, bandwidth limit, retries, checkpoint hold).
    job: JobView
    # The failover host (proxies whose host_ids name it are preferred) and its provider.
    host_id: str
    provider: Provider
    # The failed-over VM on that host, shut down.
    vm_id: str
    # The target agent next to the original host, and the failback folder its PrepareFailbackDisk readied.
    target: TargetView
    replica_path: str
    # The disks readied there (PrepareFailbackDisk): exactly the failed-over VM's disks.
    disk_ids: frozenset[str]
    # Set to stop: transfers are cancelled, and the target rolls the original back.
    stopping: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(frozen=True, kw_only=True)
class ReverseDisk:
    disk_id: str
    state: TaskState
    bytes_read: int
    bytes_sent: int
    # Raw bytes of the blocks that travelled with data, and their count in the disk's blocks. A block the
    # failed-over VM zeroed travels as a zero extent (metadata only) and is not in either figure.
    bytes_data: int
    blocks_differing: int
    error: str = ""


@dataclass(frozen=True, kw_only=True)
class ReverseResult:
    state: VmState
    # The point committed on the failback folder ("" without one): the original now holds the VM's data.
    restore_point_id: str
    checkpoint_id: str
    error: str
    disks: tuple[ReverseDisk, ...]

    @property
    def succeeded(self) -> bool:
        return self.state is VmState.DONE and bool(self.restore_point_id)


@dataclass(frozen=True)
class FailbackDisk:
    """A failback disk as the target readied it: its format is the one each transfer writes."""

    format: DiskFormat
    block_size: int
    size: int


@dataclass(kw_only=True)
class ReverseContext(SessionContext):
    """A session context whose one VM goes to a fixed replica path, disk by disk as readied there."""

    failback_path: str
    vm_id: str
    failback_disks: dict[str, FailbackDisk]

    def replica_path(self, vm_id: str) -> str:
        if vm_id != self.vm_id:
            raise FailedPrecondition(f"the reverse transfer of VM {self.vm_id} has no replica for VM {vm_id}")
        return self.failback_path


class ReverseTaskRunner(TaskRunner):
    """A disk task of the reverse transfer: always a digest comparison, in the failback disk's format."""

    async def _change_choice(self, task: Task) -> ChangeChoice:
        return ChangeChoice(ChangeMode.COMPARE)

    def _spec(self, task: Task, change: proxy_pb2.ChangeSource, *, ticket_expires: float) -> DiskTaskSpec:
        spec = super()._spec(task, change, ticket_expires=ticket_expires)
        if not isinstance(self.sc, ReverseContext):
            raise TypeError("a reverse task runs in a ReverseContext")
        return dataclasses.replace(spec, replica_format=self.sc.failback_disks[task.disk_id].format)


class ReverseVmRun(VmRun):
    """The failed-over VM through the session's states, with a commit on the failback folder only."""

    task_runner = ReverseTaskRunner

    async def _commit(self, row: SessionVm) -> None:
        if self.sc.stopping.is_set():  # undone before its commit: the target rolls the original back instead
            await self._set(VmState.RELEASING, error="stopped before the commit")
            return
        # The checkpoint must still be the one read: a VM started meanwhile with its checkpoint removed has
        # disks that are no consistent image (the same check a replication makes before its commit).
        await self._checkpoint_kept(row)
        target = self.parts.agents.target(self.sc.target.address, self.sc.target.tls_server_name)
        request = target_pb2.CommitRestorePointRequest(
            replica_path=self.sc.replica_path(row.vm_id),
            session_id=self.sc.session_id,
            checkpoint_id=row.checkpoint_id,
            disk_ids=[t.disk_id for t in await self._tasks(row)],
            change_reference=row.checkpoint_reference,
            consistency=Consistency(row.consistency).to_proto(),
            vm_configuration=row.vm_configuration or b"",
        )
        # Idempotent per session and checkpoint on the target: asked again after a lost answer, the same point.
        point: target_pb2.RestorePoint = await self._retrying()(target.commit, request, within=30)
        await self._set(VmState.RELEASING, restore_point_id=point.id)
        self.log.info("failback_point_committed", restore_point_id=point.id, replica_path=request.replica_path)

    async def _hold(self, row: SessionVm) -> None:
        # No later session continues a failback from a held checkpoint: the checkpoint goes, the VM fails,
        # and the target is told to roll the original back to how it was (EndReplicaSession).
        resumable = [t.disk_id for t in await self._tasks(row) if t.state is TaskState.RESUMABLE]
        why = "stopped" if self.sc.stopping.is_set() else "a proxy or the target could not be reached"
        error = row.error or f"disks {', '.join(resumable)} were not completed ({why}); the failback is not held"
        await self._set(VmState.RELEASING, error=error)


async def run_reverse(parts: EngineParts, request: ReverseRun) -> ReverseResult:
    """Run (or continue) the reverse transfer of `request` to its end; see the module's words."""
    row = await _planned_row(parts, request.session_id, request.vm_id)
    if row is None:
        vm = await request.provider.get_vm(request.vm_id)
        disks = await _failback_disks(parts, request, vm)
        row = await _plan(parts, request, vm)
    elif row.state in FINAL_VM:
        return await _result(parts, request, row.id)
    else:
        disks = await _failback_disks(parts, request, None)
    sc = _context(request, disks)
    log.info("reverse_transfer_running", session_id=request.session_id, vm_id=request.vm_id, state=row.state.value)
    await ReverseVmRun(parts, sc, row.id).run()
    return await _result(parts, request, row.id)


def _context(request: ReverseRun, disks: dict[str, FailbackDisk]) -> ReverseContext:
    # The job's settings but for what a failback decides itself: no guest processing (the VM is off), no
    # change tracking (digests are compared), no full checks; proxies are placed by the failover host.
    job = dataclasses.replace(
        request.job,
        host_id=request.host_id,
        guest_processing={},
        change_tracking=ChangeTracking.OFF,
        full_check_every=0,
    )
    return ReverseContext(
        session_id=request.session_id,
        job=job,
        target=request.target,
        provider=request.provider,
        stopping=request.stopping,
        failback_path=request.replica_path,
        vm_id=request.vm_id,
        failback_disks=disks,
    )


async def _planned_row(parts: EngineParts, session_id: str, vm_id: str) -> SessionVm | None:
    async with parts.journal.read() as db:
        row: SessionVm | None = await db.scalar(
            select(SessionVm).where(SessionVm.session_id == session_id, SessionVm.vm_id == vm_id)
        )
    return row


async def _failback_disks(parts: EngineParts, request: ReverseRun, vm: VmInfo | None) -> dict[str, FailbackDisk]:
    """Each readied disk as the target has it; with `vm` (before planning), checked against the VM's disks:
    the same set, the same sizes. A disk not readied would otherwise be made afresh by the transfer's
    PrepareReplicaDisk, and the original VM's disk never written."""
    if vm is not None:
        _check_disk_set(vm, request.disk_ids)
    target = parts.agents.target(request.target.address, request.target.tls_server_name)
    out: dict[str, FailbackDisk] = {}
    retrying = AsyncRetrying(
        retry=retry_if_exception(transient),
        stop=stop_after_delay(parts.target_retry_seconds),
        wait=wait_exponential(multiplier=0.2, max=2.0),
        reraise=True,
    )
    for disk_id in sorted(request.disk_ids):
        try:
            disk: target_pb2.ReplicaDisk = await retrying(target.get_disk, request.replica_path, disk_id, within=30)
        except grpc.aio.AioRpcError as e:
            if e.code() is grpc.StatusCode.NOT_FOUND:
                raise FailedPrecondition(
                    f"disk {disk_id} was not readied for failback in {request.replica_path} on target "
                    f"{request.target.name} (PrepareFailbackDisk)"
                ) from e
            raise relayed(e, f"target {request.target.name}") from e
        fmt = DiskFormat.RAW if disk.replica_format == common_pb2.DISK_FORMAT_UNSPECIFIED else None
        out[disk_id] = FailbackDisk(
            fmt or DiskFormat.from_proto("replica_format", disk.replica_format), disk.block_size, disk.disk_size
        )
    if vm is not None:
        _check_disks(vm, out, block_size=request.job.block_size)
    return out


def _check_disk_set(vm: VmInfo, disk_ids: frozenset[str]) -> None:
    have = {d.disk_id for d in vm.disks}
    if not disk_ids:
        raise FailedPrecondition(f"no disk of VM {vm.name} was readied for failback")
    if extra := sorted(have - disk_ids):
        raise FailedPrecondition(
            f"VM {vm.name} has disks the original has no failback disk for: {', '.join(extra)} (added after "
            "failover?); they would be lost"
        )
    if missing := sorted(disk_ids - have):
        raise FailedPrecondition(f"VM {vm.name} has no disk {', '.join(missing)} of the original")


def _check_disks(vm: VmInfo, disks: dict[str, FailbackDisk], *, block_size: int) -> None:
    for d in vm.disks:
        disk = disks[d.disk_id]
        if d.size != disk.size:
            raise FailedPrecondition(
                f"disk {d.disk_id} of VM {vm.name} is {d.size} bytes and the original's {disk.size}: a disk "
                "resized after failover is not failed back"
            )
        # The digests the proxy compares with are per block of the failback disk: the transfer's blocks must
        # be the same (the failback step readies each disk with the job's block size).
        if disk.block_size != block_size:
            raise FailedPrecondition(
                f"the failback disk {d.disk_id} was readied with {disk.block_size}-byte blocks, the job's are "
                f"{block_size}"
            )


async def _plan(parts: EngineParts, request: ReverseRun, vm: VmInfo) -> SessionVm:
    """The VM's row and a task per disk under the operation's session, written before any checkpoint."""
    row = SessionVm(session_id=request.session_id, vm_id=vm.vm_id, vm_name=vm.name, state=VmState.PLANNED)
    tasks = [
        Task(
            session_id=request.session_id,
            vm_id=vm.vm_id,
            vm_name=vm.name,
            disk_id=d.disk_id,
            disk_size=d.size,
            state=TaskState.PENDING,
        )
        for d in vm.disks
    ]
    async with parts.journal.change("reverse transfer planned", session_id=request.session_id, vm=vm.vm_id) as db:
        db.add(row)
        db.add_all(tasks)
    log.info("reverse_transfer_planned", session_id=request.session_id, vm_id=vm.vm_id, disks=len(tasks))
    return row


async def _result(parts: EngineParts, request: ReverseRun, row_id: str) -> ReverseResult:
    async with parts.journal.read() as db:
        row = await db.get(SessionVm, row_id)
        q = select(Task).where(Task.session_id == request.session_id, Task.vm_id == request.vm_id)
        tasks = list(await db.scalars(q.order_by(Task.disk_id)))
    if row is None:
        raise FailedPrecondition(f"the reverse transfer's row {row_id} vanished from the database")
    block = request.job.block_size
    disks = []
    for t in tasks:
        f = TransferFigures.from_json(t.stats)
        disks.append(
            ReverseDisk(
                disk_id=t.disk_id,
                state=t.state,
                bytes_read=f.bytes_read,
                bytes_sent=f.bytes_sent,
                bytes_data=f.bytes_data,
                blocks_differing=math.ceil(f.bytes_data / block) if block else 0,
                error=t.error,
            )
        )
    return ReverseResult(
        state=row.state,
        restore_point_id=row.restore_point_id,
        checkpoint_id=row.checkpoint_id,
        error=row.error,
        disks=tuple(disks),
    )


class FailbackTransfers:
    """The failback step's transfer, its undo and its end (controller.engine.operations.context.ReverseTransfer).
    Every call is idempotent: after a controller crash the same request continues or undoes."""

    def __init__(self, parts: EngineParts) -> None:
        self.parts = parts

    async def transfer(self, request: ReverseRequest) -> ReverseFigures:
        """Readies the failback disks (only before the transfer is recorded: a disk under way is never readied
        again), runs the transfer and commits it; FailedPrecondition, with the reason, unless it succeeded.
        An original disk the failed-over VM has none of (excluded from replication, so never in its points)
        is left as it is, and the log says so."""
        row = await _planned_row(self.parts, request.session_id, request.source_vm_id)
        if row is None:
            disks, sizes = await self._disks_to_fail_back(request)
            await self._ready(request, disks, sizes)
        else:
            disks = await self._planned_disks(request)
        result = await run_reverse(self.parts, await self._run(request, disks))
        if not result.succeeded:
            why = result.error or "no restore point"
            raise FailedPrecondition(f"the failback transfer of VM {request.vm_name} ended {result.state.value}: {why}")
        return ReverseFigures(
            bytes_read=sum(d.bytes_read for d in result.disks),
            bytes_sent=sum(d.bytes_sent for d in result.disks),
            blocks_differing=sum(d.blocks_differing for d in result.disks),
        )

    async def roll_back(self, request: ReverseRequest) -> None:
        """The original disks back as they were, then the failback folder removed. A transfer still under way
        is ended first (its proxies cancelled, the checkpoint removed, the target told to roll back), so no
        stream writes under the rollback. Once the transfer is committed the original holds the failed-over
        VM's data as of its checkpoint (a whole image, not a half-written one): RollbackReplica returns a
        replica to its newest point, which is then that one."""
        row = await _planned_row(self.parts, request.session_id, request.source_vm_id)
        if row is not None and row.state not in FINAL_VM:
            run = await self._run(request, await self._planned_disks(request))
            run.stopping.set()
            await run_reverse(self.parts, run)
        target = self._target(request)
        try:
            replica = await target.rollback(request.replica_path, within=60)
            log.info("failback_rolled_back", replica_path=request.replica_path, state=replica.state)
        except grpc.aio.AioRpcError as e:
            if e.code() is not grpc.StatusCode.NOT_FOUND:  # NOT_FOUND: nothing readied, or deleted already
                raise relayed(e, f"target {request.target.name}") from e
        await self._delete(request, remove_created=request.create)

    async def finish(self, request: ReverseRequest) -> None:
        """The failback folder removed from the target (the original disks stay as they are). Idempotent."""
        await self._delete(request, remove_created=False)

    async def discard(self, request: ReverseRequest) -> None:
        """A failback to a new location undone: the failback folder removed with the images the target created
        for it (each only while it is still the file it made). Idempotent."""
        await self._delete(request, remove_created=True)

    async def _delete(self, request: ReverseRequest, *, remove_created: bool) -> None:
        try:
            deleted = await self._target(request).delete_replica(request.replica_path, remove_created=remove_created)
        except grpc.aio.AioRpcError as e:
            raise relayed(e, f"target {request.target.name}") from e
        log.info(
            "failback_folder_deleted", replica_path=request.replica_path, deleted=deleted, images_removed=remove_created
        )

    def _target(self, request: ReverseRequest) -> TargetClient:
        return self.parts.agents.target(request.target.address, request.target.tls_server_name)

    async def _disks_to_fail_back(self, request: ReverseRequest) -> tuple[frozenset[str], dict[str, int]]:
        vm = await request.source.get_vm(request.source_vm_id)
        have = {d.disk_id for d in vm.disks}
        originals = {d for d, _, _ in request.original_disks}
        if left := sorted(originals - have):
            log.info(
                "failback_disks_left_as_they_are",
                session_id=request.session_id,
                vm=request.vm_name,
                disks=left,
                reason="the failed-over VM has no such disk (excluded from replication?)",
            )
        disks = frozenset(originals & have)
        _check_disk_set(vm, disks)  # before anything is readied: a disk added after failover is refused
        return disks, {d.disk_id: d.size for d in vm.disks}

    async def _planned_disks(self, request: ReverseRequest) -> frozenset[str]:
        async with self.parts.journal.read() as db:
            q = select(Task.disk_id).where(Task.session_id == request.session_id, Task.vm_id == request.source_vm_id)
            return frozenset(await db.scalars(q))

    async def _ready(self, request: ReverseRequest, disks: frozenset[str], sizes: dict[str, int]) -> None:
        """Each failback disk readied; for a new location (`create`) a new image of the failed-over disk's size."""
        target = self._target(request)
        for disk_id, original, fmt in request.original_disks:
            if disk_id not in disks:
                continue
            ask = target_pb2.PrepareFailbackDiskRequest(
                replica_path=request.replica_path,
                disk_id=disk_id,
                original_path=original,
                format=fmt.to_proto(),
                block_size=request.block_size,
                create=request.create,
                size=sizes[disk_id] if request.create else 0,
            )
            try:
                await target.prepare_failback_disk(ask)
            except grpc.aio.AioRpcError as e:
                raise relayed(e, f"target {request.target.name}") from e
        log.info("failback_disks_ready", replica_path=request.replica_path, disks=len(disks))

    async def _run(self, request: ReverseRequest, disks: frozenset[str]) -> ReverseRun:
        async with self.parts.journal.read() as db:
            job = await db.get(Job, request.job_id)
        if job is None:
            raise NotFound(f"job {request.job_id} no longer exists")
        return ReverseRun(
            session_id=request.session_id,
            job=dataclasses.replace(job_view(job), block_size=request.block_size),
            host_id=request.source_host_id,
            provider=request.source,
            vm_id=request.source_vm_id,
            target=request.target,
            replica_path=request.replica_path,
            disk_ids=disks,
        )
