"""How a VM's session ends on the target (EndReplicaSession), what a restore point records, and the replica
format a job asks for: the rules alone, then VmRun in one process on the real database and Journal with
the fake target modelling the replica's state (WRITING after a prepare, AT_POINT after a commit, RESUMABLE
or rolled back after EndReplicaSession)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from sqlalchemy import select, update

from controller.db.enums import ReplicaEnd, SessionState, TaskState, VmState
from controller.db.models import HeldCheckpoint, RestorePoint, Session, SessionVm
from controller.engine.runtime import SessionContext
from controller.engine.session import SessionRun, VmRun
from controller.engine.states import IllegalTransition, replica_session_end
from tests.support.agents import RUNNING, Crash, FakeReplica, Step, completes, progress, rpc_error
from tests.support.engine import DISK_SIZE, World, make_world
from vmrepl.domain import Consistency, DiskFormat, replica_format
from vmrepl.providers.base import VmInfo
from vmrepl.v1 import common_pb2, proxy_pb2, target_pb2

REPLICA = "jobs/job1/vm1"
AT_POINT, EMPTY = common_pb2.REPLICA_STATE_AT_POINT, common_pb2.REPLICA_STATE_EMPTY
WRITING, RESUMABLE = common_pb2.REPLICA_STATE_WRITING, common_pb2.REPLICA_STATE_RESUMABLE


# ---- the rules ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "wrote", "keep"),
    [
        (VmState.HELD, True, True),
        (VmState.FAILED, True, False),
        (VmState.STOPPED, True, False),
        (VmState.DONE, True, None),
        (VmState.FAILED, False, None),
        (VmState.HELD, False, None),
    ],
)
def test_the_target_keeps_a_sessions_writes_exactly_when_its_checkpoint_is_held(
    state: VmState, wrote: bool, keep: bool | None
) -> None:
    assert replica_session_end(state, wrote=wrote) is keep


@pytest.mark.parametrize("state", [VmState.TRANSFERRING, VmState.RELEASING, VmState.HOLDING])
def test_a_vm_that_has_not_ended_tells_the_target_nothing_yet(state: VmState) -> None:
    with pytest.raises(IllegalTransition):
        replica_session_end(state, wrote=True)


def test_a_jobs_replica_format_is_its_setting_else_the_hosts_own() -> None:
    assert replica_format("", host_provider="file") is DiskFormat.RAW
    assert replica_format("", host_provider="hyperv") is DiskFormat.VHDX
    assert replica_format("vhdx", host_provider="file") is DiskFormat.VHDX
    assert replica_format("raw", host_provider="hyperv") is DiskFormat.RAW


def test_a_stored_consistency_goes_on_the_wire_and_an_unknown_one_as_unspecified() -> None:
    assert Consistency.from_stored("application") == common_pb2.CONSISTENCY_APPLICATION
    assert Consistency.from_stored("crash") == common_pb2.CONSISTENCY_CRASH
    assert Consistency.from_stored("") == common_pb2.CONSISTENCY_UNSPECIFIED


# ---- in one process -----------------------------------------------------------------------------------


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    w = await make_world(tmp_path, vms={"vm1": ("disk0", "disk1")}, target_retry_seconds=0.5)
    yield w
    await w.close()


async def _run(w: World, row_id: str = "") -> SessionVm:
    row_id = row_id or (await w.plan())["vm1"]
    await asyncio.wait_for(VmRun(w.parts, w.sc, row_id).run(), 30)
    return await w.vm_row(row_id)


def _fails(request: proxy_pb2.StartDiskTransferRequest) -> list[Step]:
    return [
        progress(RUNNING, DISK_SIZE // 4),
        progress(proxy_pb2.TRANSFER_STATE_FAILED, DISK_SIZE // 4, error_code="IO"),
    ]


async def test_a_failed_vm_not_held_has_its_replica_rolled_back_to_the_newest_point(world: World) -> None:
    world.proxy.script = _fails
    row = await _run(world)
    assert row.state is VmState.FAILED and row.replica_end is ReplicaEnd.ROLLED_BACK
    (ended,) = world.target.ended
    assert (ended.replica_path, ended.session_id, ended.keep_for_resume) == (REPLICA, world.sc.session_id, False)
    replica = world.target.replica(REPLICA)
    assert replica.state == EMPTY and replica.rolled_back_session_id == world.sc.session_id  # no point yet


async def test_a_held_vm_keeps_its_writes_for_the_session_that_resumes_it(world: World) -> None:
    world.proxy.script = lambda r: [progress(RUNNING, DISK_SIZE // 2), Crash()]
    row = await _run(world)
    assert row.state is VmState.HELD and row.replica_end is ReplicaEnd.KEPT
    (ended,) = world.target.ended
    assert ended.keep_for_resume and ended.session_id == world.sc.session_id
    replica = world.target.replica(REPLICA)
    assert (replica.state, replica.session_id) == (RESUMABLE, world.sc.session_id) and not world.target.rollbacks


async def test_a_controller_killed_between_the_failure_and_the_call_makes_it_when_it_continues(world: World) -> None:
    world.proxy.script = _fails
    world.target.end_faults.append(asyncio.CancelledError())  # the controller dies as it makes the call
    rows = await world.plan()
    with pytest.raises(asyncio.CancelledError):
        await VmRun(world.parts, world.sc, rows["vm1"]).run()
    row = await world.vm_row(rows["vm1"])
    assert row.state is VmState.FAILED and row.replica_end is ReplicaEnd.UNTOLD
    assert world.target.replica(REPLICA).state == WRITING
    row = await _run(world, rows["vm1"])  # the restarted controller continues the session
    assert row.replica_end is ReplicaEnd.ROLLED_BACK and len(world.target.ended) == 2
    assert world.target.replica(REPLICA).state == EMPTY
    assert len(world.proxy.started) == 2  # nothing ran again: the VM had ended


async def test_a_vm_told_once_is_not_told_again_when_the_session_continues(world: World) -> None:
    world.proxy.script = _fails
    row = await _run(world)
    assert row.replica_end is ReplicaEnd.ROLLED_BACK
    await asyncio.wait_for(VmRun(world.parts, world.sc, row.id).run(), 30)
    assert len(world.target.ended) == 1


async def test_a_target_that_stays_down_does_not_keep_the_session_from_ending(world: World) -> None:
    world.proxy.script = _fails
    world.target.end_faults.extend(rpc_error(grpc.StatusCode.UNAVAILABLE) for _ in range(100))
    row = await _run(world)
    assert row.state is VmState.FAILED and row.replica_end is ReplicaEnd.NOT_TOLD
    assert len(world.target.ended) > 1  # asked again while the retry window lasted
    assert world.target.replica(REPLICA).state == WRITING  # the next session's prepare rolls it back
    await world.target.prepare(target_pb2.PrepareReplicaDiskRequest(replica_path=REPLICA, disk_id="d", session_id="s2"))
    assert world.target.rollbacks == [(REPLICA, world.sc.session_id)]


@pytest.mark.parametrize("earlier", [False, True], ids=["no-replica-yet", "kept-for-an-earlier-session"])
async def test_a_target_holding_no_writes_of_the_session_is_nothing_to_end(world: World, earlier: bool) -> None:
    # The session's prepares were refused: the replica stays as it was (none yet: NOT_FOUND; kept for an
    # earlier session: FAILED_PRECONDITION, and kept it stays).
    world.target.prepare_faults.extend([rpc_error(grpc.StatusCode.FAILED_PRECONDITION, "no")] * 2)
    if earlier:
        world.target.replicas[REPLICA] = FakeReplica(state=RESUMABLE, session_id="s-earlier")
    row = await _run(world)
    assert row.state is VmState.FAILED and row.replica_end is ReplicaEnd.NOTHING and len(world.target.ended) == 1
    assert not world.target.rollbacks
    if earlier:
        assert world.target.replica(REPLICA).state == RESUMABLE


async def test_a_vm_stopped_before_its_checkpoint_tells_the_target_nothing(world: World) -> None:
    world.sc.stopping.set()
    row = await _run(world)
    assert row.state is VmState.STOPPED and row.replica_end is ReplicaEnd.UNTOLD and not world.target.ended


async def test_a_retry_within_the_session_rolls_nothing_back_in_between(world: World) -> None:
    world.sc.job = dataclasses.replace(world.sc.job, retries=1)
    attempts = [0]

    def failing_once(request: proxy_pb2.StartDiskTransferRequest) -> list[Step]:
        attempts[0] += 1
        return _fails(request) if attempts[0] <= 2 else completes(request)

    world.proxy.script = failing_once
    row = await _run(world)
    assert row.state is VmState.DONE and row.attempt == 2
    assert not world.target.ended and not world.target.rollbacks
    replica = world.target.replica(REPLICA)
    assert replica.state == AT_POINT and replica.base_point_id == row.restore_point_id


async def test_a_failed_retry_ends_the_whole_session_on_the_target_once(world: World) -> None:
    world.sc.job = dataclasses.replace(world.sc.job, retries=1)
    world.proxy.script = _fails
    row = await _run(world)
    assert row.state is VmState.FAILED and row.attempt == 2 and row.replica_end is ReplicaEnd.ROLLED_BACK
    assert len(world.target.ended) == 1 and world.target.rollbacks == [(REPLICA, world.sc.session_id)]


# ---- what a restore point records ---------------------------------------------------------------------


class Quiescing:
    """Guest processing that quiesced the guest's applications for the checkpoint."""

    async def before_checkpoint(self, vm: VmInfo, settings: dict[str, object]) -> bool:
        return True

    async def after_checkpoint(self, vm: VmInfo, settings: dict[str, object]) -> None:
        return None


async def _point(w: World) -> RestorePoint:
    async with w.journal.read() as db:
        (point,) = list(await db.scalars(select(RestorePoint)))
    return point


async def test_a_restore_point_keeps_its_reference_consistency_size_and_disks(world: World) -> None:
    row = await _run(world)
    assert row.state is VmState.DONE and row.replica_end is ReplicaEnd.UNTOLD and not world.target.ended
    (commit,) = world.target.commits
    assert (commit.change_reference, commit.consistency) == ("ref1", common_pb2.CONSISTENCY_CRASH)
    point = await _point(world)
    assert (point.vm_name, point.size_bytes, point.consistency) == ("vm1", 2 * DISK_SIZE, "crash")
    assert point.disks == [
        {"disk_id": "disk0", "disk_size": DISK_SIZE, "format": "raw"},
        {"disk_id": "disk1", "disk_size": DISK_SIZE, "format": "raw"},
    ]


async def test_a_checkpoint_the_guest_was_quiesced_for_makes_an_application_consistent_point(world: World) -> None:
    world.parts.guest = Quiescing()
    await _run(world)
    (commit,) = world.target.commits
    assert commit.consistency == common_pb2.CONSISTENCY_APPLICATION
    assert (await _point(world)).consistency == "application"


async def test_the_jobs_replica_format_is_asked_for_in_every_prepare_and_kept_with_the_point(world: World) -> None:
    world.sc.job = dataclasses.replace(world.sc.job, replica_format=DiskFormat.VHDX)
    row = await _run(world)
    assert row.state is VmState.DONE
    assert {p.replica_format for p in world.target.prepared} == {common_pb2.DISK_FORMAT_VHDX}
    assert {d["format"] for d in (await _point(world)).disks} == {"vhdx"}
    assert {t.state for t in await world.tasks()} == {TaskState.SUCCEEDED}


# ---- sessions that continue a held checkpoint ---------------------------------------------------------


async def _next_session(w: World, *, stopping: bool = False) -> SessionContext:
    async with w.journal.change("next session") as db:
        await db.execute(update(Session).where(Session.id == w.sc.session_id).values(state=SessionState.INCOMPLETE))
        session = Session(job_id=w.sc.job.job_id, state=SessionState.RUNNING)
        db.add(session)
        await db.flush()
        session_id = session.id
    sc = SessionContext(session_id=session_id, job=w.sc.job, target=w.sc.target, provider=w.provider)
    if stopping:
        sc.stopping.set()
    w.sc = sc
    return sc


async def _held(w: World) -> HeldCheckpoint:
    async with w.journal.read() as db:
        held: HeldCheckpoint | None = await db.scalar(select(HeldCheckpoint))
    assert held is not None
    return held


async def _held_with_disk0_done(w: World) -> str:
    """A session in which disk0 completes and disk1 is stopped halfway (or before it started): the VM is
    held. The stop comes once disk0 is done (its size checked on the target), whatever the order the two
    disks ran in. Returns the session's id."""
    done = asyncio.Event()
    get_disk = w.target.get_disk

    async def noting(replica_path: str, disk_id: str, *, within: float | None = None) -> target_pb2.ReplicaDisk:
        disk = await get_disk(replica_path, disk_id, within=within)
        done.set()
        return disk

    w.target.get_disk = noting  # type: ignore[method-assign]
    w.proxy.script = lambda r: (
        completes(r) if r.disk_id == "disk0" else [progress(RUNNING, DISK_SIZE // 2), asyncio.Event()]
    )
    run = asyncio.create_task(SessionRun(w.parts, w.sc).run())
    await asyncio.wait_for(done.wait(), 30)
    w.sc.stopping.set()
    assert await asyncio.wait_for(run, 30) is SessionState.INCOMPLETE
    w.target.get_disk = get_disk  # type: ignore[method-assign]
    return w.sc.session_id


async def test_a_session_continuing_a_held_checkpoint_keeps_the_replica_it_continues(world: World) -> None:
    """Its done disk (completed under the checkpoint, nothing to send) names the held session too: a
    prepare naming none would have the target roll the replica back, and the done disk would then send
    nothing to redo what the rollback undid."""
    first = await _held_with_disk0_done(world)
    assert world.target.replica(REPLICA).state == RESUMABLE and (await _held(world)).session_id == first
    world.proxy.script = completes
    world.target.prepared.clear()
    await _next_session(world)
    assert await asyncio.wait_for(SessionRun(world.parts, world.sc).run(), 30) is SessionState.SUCCEEDED
    assert {(p.disk_id, p.resume_session_id) for p in world.target.prepared} == {("disk0", first), ("disk1", first)}
    assert not world.target.rollbacks and world.target.replica(REPLICA).state == AT_POINT


async def test_a_session_stopped_before_any_disk_started_leaves_the_hold_with_the_one_that_wrote(
    world: World,
) -> None:
    first = await _held_with_disk0_done(world)
    await _next_session(world, stopping=True)  # stopped before its transfers started
    assert await asyncio.wait_for(SessionRun(world.parts, world.sc).run(), 30) is SessionState.INCOMPLETE
    # The target keeps the first session's writes: the hold stays with it, so the next session resumes it.
    assert (await _held(world)).session_id == first and [e.session_id for e in world.target.ended] == [first]
    world.proxy.script = completes
    await _next_session(world)
    assert await asyncio.wait_for(SessionRun(world.parts, world.sc).run(), 30) is SessionState.SUCCEEDED
    assert {p.resume_session_id for p in world.target.prepared[-2:]} == {first} and not world.target.rollbacks
