"""TaskRunner in one process: the real database and Journal, fake proxy and target (tests.support.agents).

The paths that otherwise only real processes show: a proxy lost mid-transfer, a target refusing,
a pass re-run as a digest comparison, a controller restart finding its transfer, a stop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from sqlalchemy import select

from controller.db.enums import SessionState, TaskState, VmState
from controller.db.models import HeldCheckpoint, RestorePoint, Session, SessionVm, Task
from controller.engine.task import TaskRunner
from tests.support.agents import (
    COMPLETED,
    RUNNING,
    Crash,
    FakeTransfer,
    Script,
    Step,
    completes,
    progress,
    rpc_error,
    unavailable,
)
from tests.support.engine import DISK_SIZE, World, make_world
from vmrepl.domain import ChangeTracking
from vmrepl.extent import Extent, MiB
from vmrepl.progress import TransferFigures
from vmrepl.providers.base import Checkpoint
from vmrepl.security.ticket import key_id, verify_ticket
from vmrepl.v1 import common_pb2, proxy_pb2, target_pb2, ticket_pb2

REPLICA = "jobs/job1/vm1"


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    w = await make_world(tmp_path)
    yield w
    await w.close()


async def _transferring(w: World) -> tuple[Checkpoint, str]:
    """The VM planned and its checkpoint taken: the checkpoint and the id of its one disk task."""
    rows = await w.plan()
    cp = await w.provider.create_checkpoint("vm1")
    async with w.journal.change("checkpoint") as db:
        row = await db.get(SessionVm, rows["vm1"])
        assert row is not None
        row.state, row.checkpoint_id, row.checkpoint_reference = VmState.TRANSFERRING, cp.checkpoint_id, cp.reference
    (task,) = await w.tasks()
    return cp, task.id


async def _run(w: World, *, attempt: int = 1) -> tuple[TaskState, Task]:
    cp, task_id = await _transferring(w)
    end = await asyncio.wait_for(TaskRunner(w.parts, w.sc, cp, task_id, attempt=attempt).run(), 30)
    return end, await w.journal.load(Task, task_id)


def _per_start(*scripts: Script) -> Script:
    """The first start runs the first script, the second the next, ...; the last one for every later start."""
    started = [0]

    def script(request: proxy_pb2.StartDiskTransferRequest) -> list[Step]:
        i = min(started[0], len(scripts) - 1)
        started[0] += 1
        return scripts[i](request)

    return script


def _lost_after_half(loss: Step) -> Script:
    def script(request: proxy_pb2.StartDiskTransferRequest) -> list[Step]:
        return [progress(RUNNING, DISK_SIZE // 2), loss]

    return script


async def test_a_disk_replicates_with_a_ticket_for_the_proxy_that_reads_it(world: World) -> None:
    end, task = await _run(world)
    assert end is TaskState.SUCCEEDED and task.state == TaskState.SUCCEEDED
    assert task.committed_offset == DISK_SIZE and task.stats["bytes_read"] == DISK_SIZE
    assert task.change_mode == "full" and task.proxy_id == world.proxy_id
    (request,) = world.proxy.started
    assert request.transfer_id == task.id and request.change_source.WhichOneof("mode") == "full"
    ticket = verify_ticket(
        request.ticket,
        {key_id(world.signing_key.public_key()): world.signing_key.public_key()},
        session_id=world.sc.session_id,
        disk_id="disk0",
        replica_path=REPLICA,
        audience="target",
        peer="proxy1",
    )
    assert ticket.checkpoint_id == "cp1"
    (prepared,) = world.target.prepared
    assert (prepared.replica_path, prepared.disk_size, prepared.checkpoint_id) == (REPLICA, DISK_SIZE, "cp1")


@pytest.mark.parametrize(
    "loss",
    [unavailable(), rpc_error(grpc.StatusCode.NOT_FOUND, "no such transfer"), None],
    ids=["unreachable", "forgotten", "stream-ended"],
)
async def test_a_proxy_lost_mid_transfer_is_started_again_and_the_target_resumes(
    world: World, loss: grpc.aio.AioRpcError | None
) -> None:
    first: Script = _lost_after_half(loss) if loss is not None else (lambda r: [progress(RUNNING, DISK_SIZE // 2)])
    world.proxy.script = _per_start(first, completes)
    end, task = await _run(world)
    assert end is TaskState.SUCCEEDED and task.committed_offset == DISK_SIZE
    # The same transfer again (the target resumes it from what it made durable), prepared again first.
    assert [r.transfer_id for r in world.proxy.started] == [task.id, task.id]
    assert len(world.target.prepared) == 2


async def test_a_proxy_that_stays_down_leaves_a_started_disk_resumable(world: World) -> None:
    world.proxy.script = _lost_after_half(Crash())
    end, task = await _run(world)
    assert end is TaskState.RESUMABLE and task.state == TaskState.RESUMABLE
    assert "no proxy answered" in task.error and len(world.proxy.started) == 1


@pytest.mark.parametrize(
    ("refusal", "end"),
    [
        (rpc_error(grpc.StatusCode.FAILED_PRECONDITION, "replica committed by session s0"), TaskState.FAILED),
        (unavailable(), TaskState.RESUMABLE),  # out of reach for now: the next session resumes it
    ],
    ids=["refused", "unreachable"],
)
async def test_a_target_refusing_prepare_starts_no_transfer(
    world: World, refusal: grpc.aio.AioRpcError, end: TaskState
) -> None:
    world.target.prepare_faults.append(refusal)
    state, task = await _run(world)
    assert state is end and task.error == refusal.details()
    assert not world.proxy.started


async def _with_restore_point(w: World, reference: str) -> None:
    async with w.journal.change("point") as db:
        job_id, session_id = w.sc.job.job_id, w.sc.session_id
        db.add(RestorePoint(id="rp0", job_id=job_id, vm_id="vm1", session_id=session_id, reference=reference))
    w.provider.changes["disk0"] = [Extent(0, MiB)]


async def test_changed_ranges_are_used_while_the_target_trusts_them(world: World) -> None:
    await _with_restore_point(world, "ref0")
    end, task = await _run(world)
    assert end is TaskState.SUCCEEDED and (task.change_mode, task.since_reference) == ("ranges", "ref0")
    ranges = world.proxy.started[0].change_source.changed_ranges
    assert [(r.offset, r.length) for r in ranges.ranges] == [(0, MiB)] and ranges.reference_id == "ref0"


async def test_a_pass_is_re_run_as_a_digest_comparison_once_the_target_reports_a_failed_sample(world: World) -> None:
    """The proxy's sampled verification failed (the changed ranges lost writes) and the proxy was lost;
    the target remembers: the transfer started again compares digests instead of trusting the ranges."""
    await _with_restore_point(world, "ref0")
    replica = (REPLICA, "disk0")

    def failed_sample(request: proxy_pb2.StartDiskTransferRequest) -> list[Step]:
        world.target.tracking_failed.add(replica)
        return [
            progress(
                RUNNING,
                DISK_SIZE // 4,
                passes=2,
                sample=common_pb2.SampledVerification(sampled_blocks=16, mismatched_blocks=3),
            ),
            unavailable(),
        ]

    world.proxy.script = _per_start(failed_sample, completes)
    end, task = await _run(world)
    assert end is TaskState.SUCCEEDED
    modes = [r.change_source.WhichOneof("mode") for r in world.proxy.started]
    assert modes == ["changed_ranges", "compare_digests"]
    assert (task.change_mode, task.since_reference) == ("compare", "")


async def test_a_transfer_the_proxy_fails_fails_the_disk_with_its_reason(world: World) -> None:
    world.proxy.script = lambda r: [
        progress(proxy_pb2.TRANSFER_STATE_FAILED, 0, error_code="VERIFICATION", error_message="sample differs")
    ]
    end, task = await _run(world)
    assert end is TaskState.FAILED and task.error == "VERIFICATION: sample differs"


async def test_a_replica_committed_at_another_size_fails_the_disk(world: World) -> None:
    world.target.sizes[(REPLICA, "disk0")] = DISK_SIZE + MiB
    end, task = await _run(world)
    assert end is TaskState.FAILED and "differs from the size planned" in task.error


async def _running_before_a_crash(w: World) -> tuple[Checkpoint, str]:
    cp, task_id = await _transferring(w)
    async with w.journal.change("running") as db:
        task = await db.get(Task, task_id)
        assert task is not None
        task.state, task.proxy_id, task.transfer_id, task.change_mode = TaskState.RUNNING, w.proxy_id, task_id, "full"
    return cp, task_id


async def test_after_a_controller_restart_a_transfer_the_proxy_still_runs_is_watched_again(world: World) -> None:
    cp, task_id = await _running_before_a_crash(world)
    request = proxy_pb2.StartDiskTransferRequest(transfer_id=task_id, source=proxy_pb2.SourceDisk(size=DISK_SIZE))
    world.proxy.transfers[task_id] = FakeTransfer(request, completes(request))
    await world.target.prepare(  # before the crash
        target_pb2.PrepareReplicaDiskRequest(replica_path=REPLICA, disk_id="disk0", disk_size=DISK_SIZE)
    )
    world.target.prepared.clear()
    assert await TaskRunner(world.parts, world.sc, cp, task_id).run() is TaskState.SUCCEEDED
    assert not world.proxy.started and not world.target.prepared  # reattached, not started again


async def test_after_a_controller_restart_a_transfer_the_proxy_forgot_is_started_again(world: World) -> None:
    cp, task_id = await _running_before_a_crash(world)
    assert await TaskRunner(world.parts, world.sc, cp, task_id).run() is TaskState.SUCCEEDED
    assert [r.transfer_id for r in world.proxy.started] == [task_id]


async def test_a_vm_retry_starts_its_disks_under_a_new_transfer_id(world: World) -> None:
    end, task = await _run(world, attempt=2)
    assert end is TaskState.SUCCEEDED and world.proxy.started[0].transfer_id == f"{task.id}-2"


async def test_a_stop_cancels_the_transfer_and_leaves_the_disk_resumable(world: World) -> None:
    started, busy = asyncio.Event(), asyncio.Event()

    def script(request: proxy_pb2.StartDiskTransferRequest) -> list[Step]:
        started.set()
        return [progress(RUNNING, MiB), busy, progress(COMPLETED, DISK_SIZE)]

    world.proxy.script = script
    cp, task_id = await _transferring(world)
    run = asyncio.create_task(TaskRunner(world.parts, world.sc, cp, task_id).run())
    await asyncio.wait_for(started.wait(), 10)
    world.sc.stopping.set()
    assert await asyncio.wait_for(run, 10) is TaskState.RESUMABLE
    task = await world.journal.load(Task, task_id)
    assert world.proxy.cancelled == [task_id] and task.error == "stopped"


async def test_tickets_expire_when_the_held_checkpoint_does(world: World) -> None:
    # Sooner than a ticket's longest life (a day), which would cut it shorter.
    deadline = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).replace(microsecond=0)
    async with world.journal.change("held") as db:
        db.add(
            HeldCheckpoint(
                job_id=world.sc.job.job_id,
                vm_id="vm1",
                checkpoint_id="cp1",
                reference="ref1",
                session_id=world.sc.session_id,
                deadline=deadline,
            )
        )
    assert (await _run(world))[0] is TaskState.SUCCEEDED
    assert _first_ticket(world).expires_unix == int(deadline.timestamp())


def _first_ticket(world: World, *, now: float | None = None) -> ticket_pb2.TransferTicket:
    """The ticket of the first transfer started, verified as the target would (at `now`)."""
    public = world.signing_key.public_key()
    return verify_ticket(
        world.proxy.started[0].ticket,
        {key_id(public): public},
        session_id=world.sc.session_id,
        disk_id="disk0",
        replica_path=REPLICA,
        audience="target",
        peer="proxy1",
        now=now,
    )


async def test_a_checkpoint_not_held_bounds_tickets_by_the_jobs_deadline(world: World) -> None:
    world.sc.job = dataclasses.replace(world.sc.job, checkpoint_hold_seconds=600)
    assert (await _run(world))[0] is TaskState.SUCCEEDED
    cp = world.provider.checkpoints["vm1"][0]
    assert abs(_first_ticket(world, now=cp.created_at).expires_unix - (cp.created_at + 600)) <= 1


async def _earlier_session(w: World, *, change_mode: str, point: str = "rp0") -> None:
    """A session of the job before this one that made a restore point of vm1, its disk read as `change_mode`."""
    async with w.journal.change("earlier session") as db:
        earlier = Session(
            job_id=w.sc.job.job_id,
            state=SessionState.SUCCEEDED,
            started_at=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1),
        )
        db.add(earlier)
        await db.flush()
        db.add(SessionVm(session_id=earlier.id, vm_id="vm1", vm_name="vm1", state=VmState.DONE, restore_point_id=point))
        db.add(
            Task(
                session_id=earlier.id,
                vm_id="vm1",
                vm_name="vm1",
                disk_id="disk0",
                state=TaskState.SUCCEEDED,
                change_mode=change_mode,
            )
        )
        db.add(RestorePoint(id=point, job_id=w.sc.job.job_id, vm_id="vm1", session_id=earlier.id, reference="ref0"))
    w.provider.changes["disk0"] = [Extent(0, MiB)]


def _repairs(request: proxy_pb2.StartDiskTransferRequest) -> list[Step]:
    size = request.source.size
    found = common_pb2.FullCheck(
        differed_blocks=2, repaired_blocks=1, repaired_ranges=[common_pb2.ByteRange(offset=5 * MiB, length=MiB)]
    )
    return [progress(COMPLETED, size, bytes_read=size, passes=1, elapsed_seconds=1.0, full_check=found)]


@pytest.mark.parametrize("every", [1, 2])
async def test_a_due_full_check_compares_digests_with_the_hosts_changed_ranges(tmp_path: Path, every: int) -> None:
    """The last session read changed ranges; with a full check every 1 or 2 sessions this one is due: the
    disk compares every digest, the proxy gets the host's ranges to tell repaired blocks from changes, and
    the task keeps what the check repaired."""
    w = await make_world(tmp_path, full_check_every=every)
    try:
        await _earlier_session(w, change_mode="ranges")
        w.proxy.script = _repairs
        end, task = await _run(w)
        assert end is TaskState.SUCCEEDED
        (request,) = w.proxy.started
        compare = request.change_source.compare_digests
        assert request.change_source.WhichOneof("mode") == "compare_digests" and compare.HasField("full_check")
        assert [(r.offset, r.length) for r in compare.full_check.ranges] == [(0, MiB)]
        assert (task.change_mode, task.since_reference, task.full_check) == ("compare", "ref0", True)
        figures = TransferFigures.from_json(task.stats)
        assert figures.full_check is not None and figures.full_check.repaired_ranges == [(5 * MiB, MiB)]
        assert figures.verification.startswith("full check: 1 block differed from the replica although")
    finally:
        await w.close()


@pytest.mark.parametrize(("every", "earlier_mode"), [(2, "full"), (2, "compare"), (0, "ranges"), (3, "ranges")])
async def test_no_full_check_before_it_is_due(tmp_path: Path, every: int, earlier_mode: str) -> None:
    w = await make_world(tmp_path, full_check_every=every)
    try:
        await _earlier_session(w, change_mode=earlier_mode)
        end, task = await _run(w)
        assert end is TaskState.SUCCEEDED
        assert w.proxy.started[0].change_source.WhichOneof("mode") == "changed_ranges"
        assert (task.change_mode, task.full_check) == ("ranges", False)
    finally:
        await w.close()


async def test_a_full_check_asked_for_runs_even_when_the_job_never_checks(tmp_path: Path) -> None:
    w = await make_world(tmp_path, full_check_every=0)
    try:
        await _earlier_session(w, change_mode="ranges")
        w.sc.full_check = True
        end, task = await _run(w)
        assert end is TaskState.SUCCEEDED and w.proxy.started[0].change_source.compare_digests.HasField("full_check")
        assert (task.change_mode, task.full_check) == ("compare", True)
    finally:
        await w.close()


async def test_a_full_check_resumed_in_a_later_session_stays_one(world: World) -> None:
    """A disk resumed from a held checkpoint keeps the change source it started with, full check included."""
    await _earlier_session(world, change_mode="ranges")
    async with world.journal.change("earlier full check") as db:
        earlier_id = (await db.scalars(select(Session.id).where(Session.id != world.sc.session_id))).one()
        earlier = (await db.scalars(select(Task).where(Task.session_id == earlier_id))).one()
        earlier.change_mode, earlier.since_reference, earlier.full_check = "compare", "ref0", True
    rows = await world.plan()
    cp = await world.provider.create_checkpoint("vm1")
    async with world.journal.change("resume") as db:
        row = await db.get(SessionVm, rows["vm1"])
        assert row is not None
        row.state, row.checkpoint_id = VmState.TRANSFERRING, cp.checkpoint_id
        (task,) = await db.scalars(select(Task).where(Task.session_id == world.sc.session_id))
        task.start, task.resume_session_id = "resume", earlier_id
    end = await TaskRunner(world.parts, world.sc, cp, task.id).run()
    assert end is TaskState.SUCCEEDED
    assert world.proxy.started[0].change_source.compare_digests.HasField("full_check")
    assert (await world.journal.load(Task, task.id)).full_check is True


async def test_a_disk_done_under_a_checkpoint_without_a_reference_sends_nothing_and_asks_no_host(
    world: World,
) -> None:
    """Hyper-V: a checkpoint has no reference until it is converted; a disk already done under the held
    checkpoint continues with no changed range, without asking the host (which would fall back to a
    digest comparison of the whole disk, with a misleading reason)."""
    rows = await world.plan()
    cp = dataclasses.replace(await world.provider.create_checkpoint("vm1"), reference="")
    async with world.journal.change("checkpoint") as db:
        row = await db.get(SessionVm, rows["vm1"])
        assert row is not None
        row.state, row.checkpoint_id = VmState.TRANSFERRING, cp.checkpoint_id
        (task,) = list(await db.scalars(select(Task)))
        task.start = "done"
    world.provider.changes = {}  # asked, the host would say it cannot
    end = await asyncio.wait_for(TaskRunner(world.parts, world.sc, cp, task.id).run(), 30)
    done = await world.journal.load(Task, task.id)
    assert end is TaskState.SUCCEEDED and done.change_mode == "ranges" and done.fallback_reason == ""
    assert list(world.proxy.started[0].change_source.changed_ranges.ranges) == []


async def test_a_full_check_goes_on_without_the_hosts_ranges_even_when_the_job_requires_them(tmp_path: Path) -> None:
    """A job requiring change tracking fails a disk whose changes the host cannot report, but a full check
    compares every block anyway: it runs, without the ranges, which is how such a job recovers after the
    host lost its reference (`job start --full-check`)."""
    w = await make_world(tmp_path, full_check_every=1, change_tracking=ChangeTracking.ON)
    try:
        await _earlier_session(w, change_mode="ranges")
        w.provider.changes = {}  # the host cannot say
        end, task = await _run(w)
        assert end is TaskState.SUCCEEDED, task.error
        (request,) = w.proxy.started
        assert request.change_source.WhichOneof("mode") == "compare_digests"
        assert not request.change_source.compare_digests.HasField("full_check")
        assert task.change_mode == "compare" and "tracks no changes" in task.fallback_reason
    finally:
        await w.close()


async def test_without_a_full_check_a_job_requiring_change_tracking_fails_the_disk(tmp_path: Path) -> None:
    w = await make_world(tmp_path, full_check_every=0, change_tracking=ChangeTracking.ON)
    try:
        await _earlier_session(w, change_mode="ranges")
        w.provider.changes = {}
        end, task = await _run(w)
        assert end is TaskState.FAILED and "change tracking is required by the job" in task.error
    finally:
        await w.close()
