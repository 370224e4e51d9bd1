"""The reverse transfer of a failback (controller.engine.reverse) in one process: the real database and
Journal, fake agents, a fake failover host. The failed-over VM's disks go to the failback folder the target
readied, by digest comparison, under the operation's session; what is refused before anything is recorded;
a failback cut short is rolled back, not held; a controller restart continues it."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from controller.db.enums import TaskState, VmState
from controller.db.models import HeldCheckpoint, RestorePoint, SessionVm, Task
from controller.engine.journal import Journal
from controller.engine.operations.context import ReverseFigures, ReverseRequest
from controller.engine.reverse import FailbackTransfers, ReverseResult, ReverseRun, run_reverse
from tests.support.agents import (
    COMPLETED,
    RUNNING,
    CommitFault,
    Crash,
    FakeReplica,
    FakeTarget,
    Step,
    progress,
    rpc_error,
    unavailable,
)
from tests.support.engine import DISK_SIZE, FakeProvider, World, make_world
from vmrepl.domain import ChangeMode, DiskFormat
from vmrepl.errors import FailedPrecondition
from vmrepl.v1 import common_pb2, proxy_pb2, target_pb2

FAILED_OVER = "fo-vm1"  # the failed-over VM's id on the failover host


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    # The job would use the host's change tracking: a failback compares digests all the same.
    w = await make_world(tmp_path, vms={"vm1": ("disk0", "disk1")}, change_tracking="on")
    yield w
    await w.close()


def _path(w: World) -> str:
    return f".failback/{w.sc.job.job_id}/vm1"


def ready(
    target: FakeTarget,
    path: str,
    disks: dict[str, common_pb2.DiskFormat.ValueType],
    *,
    size: int = DISK_SIZE,
    block_size: int,
) -> None:
    """What PrepareFailbackDisk leaves on the target: a replica disk per original disk, at a point standing
    for the original as it was."""
    for disk_id, fmt in disks.items():
        target.disks[(path, disk_id)] = target_pb2.ReplicaDisk(
            replica_path=path, disk_id=disk_id, disk_size=size, block_size=block_size, replica_format=fmt
        )
    target.points[path] = [target_pb2.RestorePoint(id="rp-original", replica_path=path, session_id="failback")]
    target.replicas[path] = FakeReplica(state=common_pb2.REPLICA_STATE_AT_POINT)


def _request(w: World, host: FakeProvider, **over: object) -> ReverseRun:
    args: dict[str, object] = {
        "session_id": w.sc.session_id,
        "job": w.sc.job,
        "host_id": "failover-host",
        "provider": host,
        "vm_id": FAILED_OVER,
        "target": w.sc.target,
        "replica_path": _path(w),
        "disk_ids": frozenset({"disk0", "disk1"}),
    }
    args.update(over)
    return ReverseRun(**args)  # type: ignore[arg-type]


def _differing(blocks: int, block_size: int) -> proxy_pb2.TransferProgress:
    data = blocks * block_size
    return progress(
        COMPLETED, DISK_SIZE, bytes_read=DISK_SIZE, bytes_data=data, bytes_sent=data // 2, passes=1, elapsed_seconds=1
    )


async def _go(w: World, request: ReverseRun) -> ReverseResult:
    return await asyncio.wait_for(run_reverse(w.parts, request), 30)


@pytest.fixture
def host(world: World) -> FakeProvider:
    block = world.sc.job.block_size
    ready(
        world.target,
        _path(world),
        {"disk0": common_pb2.DISK_FORMAT_RAW, "disk1": common_pb2.DISK_FORMAT_VHDX},
        block_size=block,
    )
    world.proxy.script = lambda r: [_differing(3 if r.disk_id == "disk0" else 0, block)]
    return FakeProvider({FAILED_OVER: ("disk0", "disk1")})


async def test_only_differing_blocks_go_to_the_failback_folder_under_the_operations_session(
    world: World, host: FakeProvider
) -> None:
    result = await _go(world, _request(world, host))
    assert result.succeeded and result.error == ""
    (commit,) = world.target.commits
    assert (commit.replica_path, list(commit.disk_ids)) == (_path(world), ["disk0", "disk1"])
    assert result.restore_point_id == world.target.points[_path(world)][-1].id != "rp-original"
    figures = {d.disk_id: (d.bytes_read, d.bytes_data, d.blocks_differing) for d in result.disks}
    block = world.sc.job.block_size
    assert figures == {"disk0": (DISK_SIZE, 3 * block, 3), "disk1": (DISK_SIZE, 0, 0)}
    # Read from the failed-over VM's checkpoint, compared by digests, written in each original's format.
    for r in world.proxy.started:
        assert r.source.locator == f"/src/{FAILED_OVER}/{r.disk_id}@cp1" and r.replica_path == _path(world)
        assert r.change_source.WhichOneof("mode") == "compare_digests"
    formats = {p.disk_id: p.replica_format for p in world.target.prepared}
    assert formats == {"disk0": common_pb2.DISK_FORMAT_RAW, "disk1": common_pb2.DISK_FORMAT_VHDX}
    tasks = await world.tasks(FAILED_OVER)
    assert [(t.disk_id, t.state, t.change_mode) for t in tasks] == [
        ("disk0", TaskState.SUCCEEDED, ChangeMode.COMPARE.value),
        ("disk1", TaskState.SUCCEEDED, ChangeMode.COMPARE.value),
    ]
    # The failover host's checkpoint is gone; the original host was never asked; the job has no new point.
    assert host.removed == ["cp1"] and not host.checkpoints[FAILED_OVER] and world.provider.created == 0
    async with world.journal.read() as db:
        assert not list(await db.scalars(select(RestorePoint)))
        assert not list(await db.scalars(select(HeldCheckpoint)))


async def test_a_finished_reverse_transfer_asked_again_answers_the_same_without_running(
    world: World, host: FakeProvider
) -> None:
    first = await _go(world, _request(world, host))
    world.target.up = False  # not even asked
    again = await _go(world, _request(world, host))
    assert again == first and len(world.proxy.started) == 2 and len(world.target.commits) == 1


@pytest.mark.parametrize(
    ("vm_disks", "disk_ids", "size", "words"),
    [
        (
            ("disk0", "disk1", "disk2"),
            {"disk0", "disk1", "disk2"},
            DISK_SIZE,
            "disk disk2 was not readied for failback",
        ),
        (("disk0", "disk1", "disk9"), {"disk0", "disk1"}, DISK_SIZE, "no failback disk for: disk9"),
        (("disk0",), {"disk0", "disk1"}, DISK_SIZE, "has no disk disk1 of the original"),
        (("disk0", "disk1"), {"disk0", "disk1"}, DISK_SIZE // 2, "resized after failover"),
    ],
    ids=["not-readied", "disk-added-after-failover", "disk-missing", "resized"],
)
async def test_a_failback_whose_disks_do_not_match_is_refused_before_anything_is_recorded(
    world: World, vm_disks: tuple[str, ...], disk_ids: set[str], size: int, words: str
) -> None:
    ready(world.target, _path(world), dict.fromkeys(vm_disks, common_pb2.DISK_FORMAT_RAW), size=size,
          block_size=world.sc.job.block_size)  # fmt: skip
    world.target.disks.pop((_path(world), "disk2"), None)
    host = FakeProvider({FAILED_OVER: vm_disks})
    with pytest.raises(FailedPrecondition, match=words):
        await _go(world, _request(world, host, disk_ids=frozenset(disk_ids)))
    assert host.created == 0 and not world.proxy.started and not world.target.prepared
    async with world.journal.read() as db:
        assert not list(await db.scalars(select(SessionVm))) and not list(await db.scalars(select(Task)))


async def test_a_failback_disk_readied_with_other_blocks_is_refused(world: World) -> None:
    ready(world.target, _path(world), {"disk0": common_pb2.DISK_FORMAT_RAW}, block_size=world.sc.job.block_size * 2)
    host = FakeProvider({FAILED_OVER: ("disk0",)})
    with pytest.raises(FailedPrecondition, match="blocks, the job's are"):
        await _go(world, _request(world, host, disk_ids=frozenset({"disk0"})))


async def test_a_target_out_of_reach_before_planning_is_relayed(world: World, host: FakeProvider) -> None:
    world.target.up = False
    world.parts.target_retry_seconds = 0.1
    with pytest.raises(Exception, match="target target answered UNAVAILABLE"):
        await _go(world, _request(world, host))
    assert host.created == 0


async def test_a_failback_cut_short_is_not_held_and_the_target_rolls_the_original_back(
    world: World, host: FakeProvider
) -> None:
    # The proxy goes down mid-transfer and stays down: a replication would hold the checkpoint for the next
    # session; no session continues a failback, so the checkpoint goes and the writes are rolled back.
    world.proxy.script = lambda r: [progress(RUNNING, DISK_SIZE // 2), Crash()]
    result = await _go(world, _request(world, host))
    assert result.state is VmState.FAILED and not result.succeeded and "were not completed" in result.error
    assert {d.state for d in result.disks} == {TaskState.RESUMABLE}
    assert host.removed == ["cp1"] and not world.target.commits
    (ended,) = world.target.ended
    assert (ended.replica_path, ended.keep_for_resume) == (_path(world), False)
    assert world.target.rollbacks == [(_path(world), world.sc.session_id)]
    async with world.journal.read() as db:
        assert not list(await db.scalars(select(HeldCheckpoint)))


async def test_a_stopped_failback_cancels_its_transfers_and_rolls_back(world: World, host: FakeProvider) -> None:
    started, busy = asyncio.Event(), asyncio.Event()

    def script(request: proxy_pb2.StartDiskTransferRequest) -> list[Step]:
        started.set()
        return [progress(RUNNING, DISK_SIZE // 4), busy, _differing(1, world.sc.job.block_size)]

    world.proxy.script = script
    request = _request(world, host)
    run = asyncio.create_task(run_reverse(world.parts, request))
    await asyncio.wait_for(started.wait(), 10)
    request.stopping.set()
    result = await asyncio.wait_for(run, 10)
    assert result.state is VmState.FAILED and "stopped" in result.error and world.proxy.cancelled
    assert world.target.rollbacks == [(_path(world), world.sc.session_id)] and not world.target.commits


async def test_a_controller_restart_continues_the_failback_where_it_was(world: World, host: FakeProvider) -> None:
    started, busy = asyncio.Event(), asyncio.Event()

    def script(request: proxy_pb2.StartDiskTransferRequest) -> list[Step]:
        if request.disk_id == "disk1":
            started.set()
        return [progress(RUNNING, DISK_SIZE // 4), busy, _differing(2, world.sc.job.block_size)]

    world.proxy.script = script
    run = asyncio.create_task(run_reverse(world.parts, _request(world, host)))
    await asyncio.wait_for(started.wait(), 10)
    await asyncio.sleep(0.1)
    run.cancel()  # the controller dies: its rows say TRANSFERRING, the proxy goes on
    with pytest.raises(asyncio.CancelledError):
        await run
    busy.set()
    result = await _go(world, _request(world, host))
    assert result.succeeded and [d.blocks_differing for d in result.disks] == [2, 2]
    assert len(world.proxy.started) == 2 and host.created == 1  # watched again: nothing started twice
    assert len(world.target.commits) == 1


async def test_a_commit_lost_for_a_moment_is_asked_again(world: World, host: FakeProvider) -> None:
    world.target.commit_faults.append(CommitFault(unavailable(), committed=True))
    result = await _go(world, _request(world, host))
    assert result.succeeded and len(world.target.commits) == 2
    assert [p.id for p in world.target.points[_path(world)]] == ["rp-original", result.restore_point_id]


async def test_a_commit_refused_fails_the_failback_and_rolls_back(world: World, host: FakeProvider) -> None:
    refused = rpc_error(grpc.StatusCode.FAILED_PRECONDITION, "the failback disk is no longer the original's")
    world.target.commit_faults.append(CommitFault(refused))
    result = await _go(world, _request(world, host))
    assert result.state is VmState.FAILED and result.error == "the failback disk is no longer the original's"
    assert world.target.rollbacks == [(_path(world), world.sc.session_id)]


# ---- FailbackTransfers: what the failback step calls ----


class FailbackTarget(FakeTarget):
    """PrepareFailbackDisk as the target does it: a disk of the original's size at a point for the original."""

    def __init__(self, address: str, *, block_size: int) -> None:
        super().__init__(address)
        self.block_size = block_size

    async def prepare_failback_disk(self, request: target_pb2.PrepareFailbackDiskRequest) -> target_pb2.ReplicaDisk:
        await super().prepare_failback_disk(request)
        if request.block_size != self.block_size:
            raise rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "block_size differs")
        ready(self, request.replica_path, {request.disk_id: request.format}, block_size=request.block_size)
        return self.disks[(request.replica_path, request.disk_id)]


@pytest.fixture
def failback(world: World) -> FailbackTarget:
    target = FailbackTarget(world.target.address, block_size=world.sc.job.block_size)
    world.parts.agents.targets[target.address] = target  # type: ignore[attr-defined]
    world.target = target
    block = world.sc.job.block_size
    world.proxy.script = lambda r: [_differing(4 if r.disk_id == "disk1" else 1, block)]
    return target


def _failback_request(w: World, host: FakeProvider) -> ReverseRequest:
    return ReverseRequest(
        session_id=w.sc.session_id,
        job_id=w.sc.job.job_id,
        vm_id="vm1",
        vm_name="vm1",
        source_host_id="failover-host",
        source=host,
        source_vm_id=FAILED_OVER,
        target=w.sc.target,
        replica_path=_path(w),
        original_disks=(("disk0", "/src/vm1/disk0", DiskFormat.RAW), ("disk1", "/src/vm1/disk1", DiskFormat.VHDX)),
        block_size=w.sc.job.block_size,
    )


async def test_a_failback_transfer_readies_the_originals_then_sends_what_differs(
    world: World, failback: FailbackTarget
) -> None:
    host = FakeProvider({FAILED_OVER: ("disk0", "disk1")})
    transfers, request = FailbackTransfers(world.parts), _failback_request(world, host)
    figures = await asyncio.wait_for(transfers.transfer(request), 30)
    assert figures == ReverseFigures(bytes_read=2 * DISK_SIZE, bytes_sent=5 * world.sc.job.block_size // 2,
                                     blocks_differing=5)  # fmt: skip
    readied = [(r.replica_path, r.disk_id, r.original_path, r.format) for r in failback.failback_disks]
    assert readied == [
        (_path(world), "disk0", "/src/vm1/disk0", common_pb2.DISK_FORMAT_RAW),
        (_path(world), "disk1", "/src/vm1/disk1", common_pb2.DISK_FORMAT_VHDX),
    ]
    assert [c.replica_path for c in failback.commits] == [_path(world)]
    # Asked again (a controller restart after the step): the same figures, nothing readied or sent again.
    assert await transfers.transfer(request) == figures
    assert len(failback.failback_disks) == 2 and len(world.proxy.started) == 2 and len(failback.commits) == 1
    await transfers.finish(request)
    await transfers.finish(request)
    assert failback.deleted_replicas == [_path(world)] * 2 and (_path(world), "disk0") not in failback.disks


async def test_a_failback_transfer_that_fails_says_why_and_its_undo_leaves_the_original_as_it_was(
    world: World, failback: FailbackTarget
) -> None:
    world.proxy.script = lambda r: [progress(proxy_pb2.TRANSFER_STATE_FAILED, 0, error_message="source unreadable")]
    transfers = FailbackTransfers(world.parts)
    request = _failback_request(world, FakeProvider({FAILED_OVER: ("disk0", "disk1")}))
    with pytest.raises(FailedPrecondition, match=r"failback transfer of VM vm1 ended failed: .*source unreadable"):
        await transfers.transfer(request)
    assert failback.rollbacks == [(_path(world), world.sc.session_id)]  # told at the VM's end already
    await transfers.roll_back(request)
    assert failback.deleted_replicas == [_path(world)] and not failback.commits


async def test_undoing_a_failback_transfer_cut_by_a_crash_cancels_its_streams_before_the_rollback(
    world: World, failback: FailbackTarget
) -> None:
    started, busy = asyncio.Event(), asyncio.Event()

    def script(request: proxy_pb2.StartDiskTransferRequest) -> list[Step]:
        if request.disk_id == "disk1":
            started.set()
        # Busy until cancelled (twice: the watch the crash cut consumed one wait).
        return [progress(RUNNING, DISK_SIZE // 4), busy, busy, _differing(2, world.sc.job.block_size)]

    world.proxy.script = script
    host = FakeProvider({FAILED_OVER: ("disk0", "disk1")})
    transfers, request = FailbackTransfers(world.parts), _failback_request(world, host)
    run = asyncio.create_task(transfers.transfer(request))
    await asyncio.wait_for(started.wait(), 10)
    await asyncio.sleep(0.1)
    run.cancel()  # the controller dies mid-transfer; after its restart the operation undoes the step
    with pytest.raises(asyncio.CancelledError):
        await run
    await asyncio.wait_for(transfers.roll_back(request), 30)
    assert sorted(world.proxy.cancelled) == sorted(r.transfer_id for r in world.proxy.started)
    assert host.removed == ["cp1"] and not failback.commits
    assert failback.rollbacks == [(_path(world), world.sc.session_id)]
    assert failback.deleted_replicas == [_path(world)]


async def test_a_failback_disk_the_target_refuses_to_ready_records_nothing(
    world: World, failback: FailbackTarget
) -> None:
    failback.mount_faults["prepare_failback_disk"] = [
        rpc_error(grpc.StatusCode.FAILED_PRECONDITION, "/src/vm1/disk0 is outside the failback roots")
    ]
    host = FakeProvider({FAILED_OVER: ("disk0", "disk1")})
    with pytest.raises(FailedPrecondition, match=r"target target answered FAILED_PRECONDITION: .*failback roots"):
        await FailbackTransfers(world.parts).transfer(_failback_request(world, host))
    assert host.created == 0 and not world.proxy.started
    async with world.journal.read() as db:
        assert not list(await db.scalars(select(SessionVm)))
    await FailbackTransfers(world.parts).roll_back(_failback_request(world, host))  # nothing to roll back
    assert failback.deleted_replicas == [_path(world)]


async def test_an_original_disk_the_failed_over_vm_lacks_is_left_as_it_is(
    world: World, failback: FailbackTarget
) -> None:
    # disk1 was excluded from replication: no point holds it, so the failed-over VM has none.
    host = FakeProvider({FAILED_OVER: ("disk0",)})
    figures = await asyncio.wait_for(FailbackTransfers(world.parts).transfer(_failback_request(world, host)), 30)
    assert figures.blocks_differing == 1 and [r.disk_id for r in failback.failback_disks] == ["disk0"]
    assert [r.disk_id for r in world.proxy.started] == ["disk0"] and list(failback.commits[0].disk_ids) == ["disk0"]


async def test_a_disk_added_to_the_failed_over_vm_refuses_the_failback(world: World, failback: FailbackTarget) -> None:
    host = FakeProvider({FAILED_OVER: ("disk0", "disk1", "disk2")})
    with pytest.raises(FailedPrecondition, match="no failback disk for: disk2"):
        await FailbackTransfers(world.parts).transfer(_failback_request(world, host))
    assert not world.proxy.started and host.created == 0 and not failback.failback_disks


# ---- a controller killed after every committed change ----


class Killed(BaseException):
    """The controller dies (nothing of this process runs on; the agents and the host go on)."""


class KillingJournal(Journal):
    """The journal with the crash hook's effect in one process: after the `kill_at`th committed change the
    caller never gets control back."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], *, kill_at: int) -> None:
        super().__init__(sessions)
        self.kill_at = kill_at

    @asynccontextmanager
    async def change(self, what: str, **ids: Any) -> AsyncIterator[AsyncSession]:
        async with super().change(what, **ids) as db:
            yield db
        if self.changes == self.kill_at:
            raise Killed(what)


async def _killed_world(tmp_path: Path, kill_at: int) -> tuple[World, FailbackTarget, FakeProvider]:
    tmp_path.mkdir()
    w = await make_world(tmp_path, vms={"vm1": ("disk0",)})
    target = FailbackTarget(w.target.address, block_size=w.sc.job.block_size)
    w.parts.agents.targets[target.address] = target  # type: ignore[attr-defined]
    w.target = target
    w.proxy.script = lambda r: [progress(RUNNING, DISK_SIZE // 2), _differing(2, w.sc.job.block_size)]
    w.parts.journal = KillingJournal(w.journal._sessions, kill_at=kill_at)
    return w, target, FakeProvider({FAILED_OVER: ("disk0",)})


def _one_disk(w: World, host: FakeProvider) -> ReverseRequest:
    r = _failback_request(w, host)
    return dataclasses.replace(r, original_disks=r.original_disks[:1])


async def _changes_of_a_whole_failback(tmp_path: Path) -> int:
    w, _, host = await _killed_world(tmp_path / "count", 0)
    try:
        await FailbackTransfers(w.parts).transfer(_one_disk(w, host))
        return w.parts.journal.changes
    finally:
        await w.close()


@pytest.mark.parametrize("then", ["continue", "undo"])
async def test_a_controller_killed_after_any_change_continues_or_undoes_the_failback(tmp_path: Path, then: str) -> None:
    total = await _changes_of_a_whole_failback(tmp_path)
    assert total >= 8
    for n in range(1, total + 1):
        w, target, host = await _killed_world(tmp_path / f"kill{n}", n)
        try:
            with pytest.raises(Killed):
                await FailbackTransfers(w.parts).transfer(_one_disk(w, host))
            w.parts.journal = Journal(w.journal._sessions)  # restarted
            transfers = FailbackTransfers(w.parts)
            if then == "continue":
                figures = await asyncio.wait_for(transfers.transfer(_one_disk(w, host)), 30)
                assert figures.blocks_differing == 2, n
                new = [p.id for p in target.points[_path(w)] if p.id != "rp-original"]
                assert len(new) == 1 and {c.checkpoint_id for c in target.commits} == {"cp1"}, n
            else:
                await asyncio.wait_for(transfers.roll_back(_one_disk(w, host)), 30)
                assert target.deleted_replicas == [_path(w)], n
                committed = bool(target.commits)
                # Undone before its commit, the target rolled the original back, if the transfer had begun to
                # write it (once the point is committed the original is the failed-over VM's image, whole:
                # nothing is half written either way).
                began = bool(target.prepared)
                assert committed or target.rollbacks == ([(_path(w), w.sc.session_id)] if began else []), n
            assert not host.checkpoints.get(FAILED_OVER), n  # no checkpoint left on the failed-over VM
            assert len(target.failback_disks) <= 2 and len(w.proxy.started) <= 2, n
            async with w.journal.read() as db:
                assert not list(await db.scalars(select(HeldCheckpoint))), n
        finally:
            await w.close()
