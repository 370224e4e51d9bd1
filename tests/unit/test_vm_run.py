"""VmRun in one process: a VM driven through its states on the real database and Journal, with fake
agents and a fake provider. Commits that fail (for a moment, for good, with a lost answer), checkpoint
handling (orphans, one in use, one removed under the transfer, one held), retries and retention."""

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
from controller.db.models import HeldCheckpoint, RestorePoint, Session, SessionVm
from controller.engine.session import VmRun
from tests.support.agents import RUNNING, CommitFault, Crash, Step, completes, progress, rpc_error, unavailable
from tests.support.engine import DISK_SIZE, FakeProvider, World, make_world
from vmrepl.providers.base import Checkpoint, KeptReference
from vmrepl.v1 import proxy_pb2, target_pb2

REPLICA = "jobs/job1/vm1"


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    w = await make_world(tmp_path, vms={"vm1": ("disk0", "disk1")})
    yield w
    await w.close()


async def _run(w: World) -> SessionVm:
    rows = await w.plan()
    await asyncio.wait_for(VmRun(w.parts, w.sc, rows["vm1"]).run(), 30)
    return await w.vm_row(rows["vm1"])


async def _points(w: World) -> list[RestorePoint]:
    async with w.journal.read() as db:
        return list(await db.scalars(select(RestorePoint).order_by(RestorePoint.created_at)))


async def test_a_vm_whose_disks_replicate_gets_a_restore_point_and_its_checkpoint_goes(world: World) -> None:
    row = await _run(world)
    assert row.state == VmState.DONE and row.error == "" and row.checkpoint_id == "cp1"
    (point,) = await _points(world)
    assert row.restore_point_id == point.id and point.reference == "ref1"  # the next incremental's "since"
    (commit,) = world.target.commits
    assert (commit.replica_path, commit.checkpoint_id, list(commit.disk_ids)) == (REPLICA, "cp1", ["disk0", "disk1"])
    assert world.provider.removed == ["cp1"] and not world.provider.checkpoints["vm1"]


@pytest.mark.parametrize("committed", [False, True], ids=["refused-for-a-moment", "answer-lost"])
async def test_a_commit_failing_for_a_moment_is_asked_again_and_recorded_once(world: World, committed: bool) -> None:
    # Out of reach for a moment; or the target committed, then went away before answering: asked
    # again, it answers with the same point.
    world.target.commit_faults.append(CommitFault(unavailable(), committed=committed))
    row = await _run(world)
    assert row.state == VmState.DONE and len(world.target.commits) == 2
    (point,) = await _points(world)
    assert [p.id for p in world.target.points[REPLICA]] == [point.id] == [row.restore_point_id]


async def test_a_commit_the_target_refuses_fails_the_vm_and_releases_its_checkpoint(world: World) -> None:
    world.target.commit_faults.append(
        CommitFault(rpc_error(grpc.StatusCode.FAILED_PRECONDITION, "disk disk1 is not complete"))
    )
    row = await _run(world)
    assert row.state == VmState.FAILED and row.error == "disk disk1 is not complete"
    assert len(world.target.commits) == 1 and not await _points(world) and row.restore_point_id == ""
    assert world.provider.removed == ["cp1"]


async def test_a_checkpoint_removed_while_its_disks_were_read_makes_no_restore_point(world: World) -> None:
    def removed_meanwhile(request: proxy_pb2.StartDiskTransferRequest) -> list[Step]:
        world.provider.checkpoints["vm1"] = []  # someone else removed it: its overlay merged under the read
        return completes(request)

    world.proxy.script = removed_meanwhile
    row = await _run(world)
    assert row.state == VmState.FAILED and "was removed while its disks were read" in row.error
    assert not world.target.commits and not await _points(world)


async def test_an_orphan_checkpoint_of_a_crash_goes_before_a_new_one_is_taken(world: World) -> None:
    await world.provider.create_checkpoint("vm1")  # cp1: created, then the controller crashed
    row = await _run(world)
    assert row.state == VmState.DONE and row.checkpoint_id == "cp2"
    assert world.provider.removed == ["cp1", "cp2"]


async def test_a_checkpoint_another_running_session_reads_is_left_alone(world: World) -> None:
    other = await world.provider.create_checkpoint("vm1")
    async with world.journal.change("other session") as db:
        session = Session(job_id=world.sc.job.job_id, state=SessionState.RUNNING)
        db.add(session)
        await db.flush()
        db.add(
            SessionVm(
                session_id=session.id,
                vm_id="vm1",
                vm_name="vm1",
                state=VmState.TRANSFERRING,
                checkpoint_id=other.checkpoint_id,
            )
        )
    row = await _run(world)
    assert row.state == VmState.FAILED and "one job at a time" in row.error
    assert world.provider.removed == [] and [c.checkpoint_id for c in world.provider.checkpoints["vm1"]] == ["cp1"]
    assert {t.state for t in await world.tasks()} == {TaskState.FAILED} and not world.proxy.started


async def test_disks_left_resumable_keep_the_checkpoint_held_for_the_next_session(world: World) -> None:
    world.proxy.script = lambda r: [progress(RUNNING, DISK_SIZE // 2), Crash()]
    row = await _run(world)
    assert row.state == VmState.HELD and not world.target.commits
    async with world.journal.read() as db:
        held = await db.scalar(select(HeldCheckpoint))
    assert held is not None and (held.checkpoint_id, held.reference) == ("cp1", "ref1")
    deadline = held.deadline if held.deadline.tzinfo else held.deadline.replace(tzinfo=dt.UTC)
    assert deadline > dt.datetime.now(dt.UTC)
    assert world.provider.removed == [] and {t.state for t in await world.tasks()} == {TaskState.RESUMABLE}


async def test_a_failed_vm_is_retried_with_a_new_checkpoint_and_new_transfers(world: World) -> None:
    world.sc.job = dataclasses.replace(world.sc.job, retries=1)
    attempts = [0]

    def failing_once(request: proxy_pb2.StartDiskTransferRequest) -> list[Step]:
        attempts[0] += 1
        if attempts[0] <= 2:  # both disks of the first attempt
            return [progress(proxy_pb2.TRANSFER_STATE_FAILED, 0, error_code="IO", error_message="read failed")]
        return completes(request)

    world.proxy.script = failing_once
    row = await _run(world)
    assert row.state == VmState.DONE and row.attempt == 2 and row.checkpoint_id == "cp2"
    assert world.provider.removed == ["cp1", "cp2"]
    ids = [r.transfer_id for r in world.proxy.started]
    assert len(ids) == 4 and all(i.endswith("-2") for i in ids[2:]) and not any(i.endswith("-2") for i in ids[:2])


async def test_a_failed_vm_is_not_retried_once_its_retries_are_used(world: World) -> None:
    world.proxy.script = lambda r: [progress(proxy_pb2.TRANSFER_STATE_FAILED, 0, error_code="IO", error_message="x")]
    row = await _run(world)
    assert row.state == VmState.FAILED and row.attempt == 1 and "disk disk0: IO: x" in row.error
    assert world.provider.removed == ["cp1"] and not world.target.commits


def _point(point_id: str, session_id: str) -> target_pb2.RestorePoint:
    return target_pb2.RestorePoint(id=point_id, replica_path=REPLICA, session_id=session_id)


async def test_retention_keeps_the_newest_points_and_orphans_on_the_target_go(world: World) -> None:
    world.sc.job = dataclasses.replace(world.sc.job, restore_points_to_keep=1)
    old = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    async with world.journal.change("older point") as db:
        job_id, session_id = world.sc.job.job_id, world.sc.session_id
        db.add(RestorePoint(id="rp-old", job_id=job_id, vm_id="vm1", session_id=session_id, created_at=old))
    # rp-old is known to the database; rp-orphan was committed by a call whose answer never came.
    world.target.points[REPLICA] = [_point("rp-old", "s0"), _point("rp-orphan", "s-lost")]
    row = await _run(world)
    assert row.state == VmState.DONE
    assert sorted(world.target.deleted) == [(REPLICA, "rp-old"), (REPLICA, "rp-orphan")]
    assert [p.id for p in await _points(world)] == [row.restore_point_id]
    assert [p.id for p in world.target.points[REPLICA]] == [row.restore_point_id]


async def test_a_vm_of_a_stopped_session_takes_no_checkpoint(world: World) -> None:
    world.sc.stopping.set()
    row = await _run(world)
    assert row.state == VmState.STOPPED and world.provider.created == 0
    assert {t.state for t in await world.tasks()} == {TaskState.RESUMABLE}


class Converted(BaseException):
    """The controller killed inside keep_reference, after the host converted the checkpoint."""


class ConvertingProvider(FakeProvider):
    """A host whose checkpoints become reference points (Hyper-V's ConvertToReferencePoint): the checkpoint
    goes, a new reference appears; `crash_after_convert` kills the caller right after the host converted."""

    def __init__(self, vms: dict[str, tuple[str, ...]]) -> None:
        super().__init__(vms)
        self.kept: list[str] = []
        self.dropped: list[str] = []
        self.crash_after_convert = False

    async def keep_reference(self, checkpoint: Checkpoint) -> KeptReference:
        await self.remove_checkpoint(checkpoint.vm_id, checkpoint.checkpoint_id)
        self.kept.append(f"rp-{checkpoint.checkpoint_id}")
        if self.crash_after_convert:
            self.crash_after_convert = False
            raise Converted()
        return KeptReference(self.kept[-1], checkpoint_removed=True)

    async def drop_reference(self, vm_id: str, reference: str) -> None:
        self.dropped.append(reference)


def _converting(w: World) -> ConvertingProvider:
    provider = ConvertingProvider({"vm1": ("disk0", "disk1")})
    w.provider = w.sc.provider = provider
    return provider


async def _next_session(w: World) -> None:
    """The job's next session: the VM runs again under a new session id."""
    async with w.journal.change("next session") as db:
        session = Session(job_id=w.sc.job.job_id, state=SessionState.RUNNING)
        db.add(session)
        await db.flush()
        w.sc.session_id = session.id


async def test_an_older_reference_is_dropped_only_once_the_newer_point_is_committed(world: World) -> None:
    host = _converting(world)
    first = await _run(world)
    assert first.state == VmState.DONE and host.kept == ["rp-cp1"] and host.dropped == []
    await _next_session(world)
    second = await _run(world)
    assert second.state == VmState.DONE and host.kept == ["rp-cp1", "rp-cp2"]
    assert host.dropped == ["rp-cp1"]  # after rp-cp2's point was committed
    assert [p.reference for p in await _points(world)] == ["rp-cp1", "rp-cp2"]
    assert [c.change_reference for c in world.target.commits] == ["rp-cp1", "rp-cp2"]
    await _next_session(world)
    await _run(world)
    assert host.dropped == ["rp-cp1", "rp-cp2"]  # each dropped once, never the newest


async def test_a_reference_kept_for_a_point_never_committed_is_dropped(world: World) -> None:
    host = _converting(world)
    world.target.commit_faults.append(CommitFault(rpc_error(grpc.StatusCode.FAILED_PRECONDITION, "refused")))
    row = await _run(world)
    assert row.state == VmState.FAILED and not await _points(world)
    assert host.kept == ["rp-cp1"] and host.dropped == ["rp-cp1"]


async def test_a_controller_killed_inside_the_conversion_makes_no_point_from_a_lost_checkpoint(world: World) -> None:
    host = _converting(world)
    host.crash_after_convert = True
    rows = await world.plan()
    with pytest.raises(Converted):
        await asyncio.wait_for(VmRun(world.parts, world.sc, rows["vm1"]).run(), 30)
    # The controller starts again and continues the VM: its checkpoint is gone, so no point is made from it.
    await asyncio.wait_for(VmRun(world.parts, world.sc, rows["vm1"]).run(), 30)
    row = await world.vm_row(rows["vm1"])
    assert row.state == VmState.FAILED and "was removed while its disks were read" in row.error
    assert not world.target.commits and not await _points(world)
