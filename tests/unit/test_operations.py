"""Replica operations in one process (controller.engine.operations): the real database and Journal, the fake
target's mounts, hosts that register and power VMs in memory, a fake reverse transfer. Each operation's happy
path, each refusal, a failing step undone, and the plans (pure)."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from sqlalchemy import select

from controller.db.enums import OperationStepState, ReplicaVmState, SessionKind, SessionState
from controller.db.models import JobVm, OperationVm, ReplicaVm, RestorePoint, Session, SessionVm, TestFailover, now
from controller.engine.operations.context import OperationRequest
from controller.engine.operations.plans import PLANS, Operation, Step, check_start, plan_for
from tests.support.operations import REPLICA, OpsWorld, make_ops_world, settle
from vmrepl.domain import DiskFormat, PowerState
from vmrepl.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from vmrepl.v1 import target_pb2


@pytest.fixture
async def ow(tmp_path: Path) -> AsyncIterator[OpsWorld]:
    world = await make_ops_world(tmp_path)
    await world.add_point(age_seconds=30)
    await world.add_point(age_seconds=20)
    await world.add_point(age_seconds=10)
    yield world
    await world.w.close()


async def run(ow: OpsWorld, op: Operation, *, vms: tuple[str, ...] = ("vm1",), **request: object) -> Session:
    session = await ow.ops.start(ow.job_id, op, [list(vms)], OperationRequest(**request))  # type: ignore[arg-type]
    await settle(ow.ops, session.id)
    return await ow.w.journal.load(Session, session.id)


async def replica_vm(ow: OpsWorld, vm_id: str = "vm1") -> ReplicaVm:
    async with ow.w.journal.read() as db:
        row = await db.scalar(select(ReplicaVm).where(ReplicaVm.vm_id == vm_id))
    assert row is not None
    return row


async def op_rows(ow: OpsWorld, session_id: str) -> list[OperationVm]:
    async with ow.w.journal.read() as db:
        return list(await db.scalars(select(OperationVm).where(OperationVm.session_id == session_id)))


def live_mounts(ow: OpsWorld) -> list[target_pb2.Mount]:
    return [m for m in ow.w.target.mounts.values() if m.state != target_pb2.MOUNT_STATE_GONE]


# ---- the plans (pure) ----


def test_every_plan_ends_recording_and_undoes_what_it_did_last_first() -> None:
    for plan in PLANS.values():
        assert plan.steps[-1] is Step.RECORD
    failover = plan_for(Operation.FAILOVER)
    assert failover.undo_steps(Step.START) == (Step.STOP, Step.UNREGISTER, Step.UNMOUNT)
    assert failover.undo_steps(Step.MOUNT) == (Step.UNMOUNT,)
    planned = plan_for(Operation.PLANNED_FAILOVER)
    assert planned.undo_steps(Step.MOUNT) == (Step.UNMOUNT, Step.START_SOURCE)
    failback = plan_for(Operation.FAILBACK)
    assert failback.undo_steps(Step.START_ORIGINAL) == (Step.STOP_ORIGINAL, Step.ROLLBACK_TRANSFER, Step.START)
    # After the layers are merged there is no way back: a failure is left to a second run.
    permanent = plan_for(Operation.PERMANENT_FAILOVER)
    assert permanent.undo_steps(Step.FLATTEN) is None
    # The file host's provider names the merged images once the target flattened them; the mount's record
    # (flattened: the folder is the VM's) goes last, after the replica.
    assert permanent.steps == (
        Step.STOP, Step.FLATTEN, Step.MERGE, Step.START, Step.DELETE_REPLICA, Step.UNMOUNT, Step.RECORD
    )  # fmt: skip
    hyperv = plan_for(Operation.PERMANENT_FAILOVER, host_provider="hyperv")
    assert hyperv.steps[:2] == (Step.SHUTDOWN_FAILED_OVER, Step.MERGE)  # Hyper-V merges only while the VM is off
    assert hyperv.steps[-3:] == (Step.DELETE_REPLICA, Step.UNMOUNT, Step.RECORD)
    assert hyperv.undo_steps(Step.SHUTDOWN_FAILED_OVER) == (Step.START,) and hyperv.undo_steps(Step.MERGE) is None


def test_refusals_name_the_vm_and_why() -> None:
    with pytest.raises(FailedPrecondition, match="VM web01 is not failed over: no undo failover"):
        check_start(PLANS[Operation.UNDO_FAILOVER], ReplicaVmState.REPLICATING, vm="web01", busy_session="")
    with pytest.raises(FailedPrecondition, match="is failed over already: no failover"):
        check_start(PLANS[Operation.FAILOVER], ReplicaVmState.FAILED_OVER, vm="web01", busy_session="")
    with pytest.raises(FailedPrecondition, match="operation session s1 is working on it"):
        check_start(PLANS[Operation.FAILOVER], ReplicaVmState.REPLICATING, vm="web01", busy_session="s1")
    # ... and what can be run on it instead.
    with pytest.raises(FailedPrecondition, match="no commit failback; next: undo-failover, failback or permanent-fa"):
        check_start(PLANS[Operation.COMMIT_FAILBACK], ReplicaVmState.FAILED_OVER, vm="web01", busy_session="")
    with pytest.raises(FailedPrecondition, match=r"no failback; it can be failed over \(failover, planned-failover\)"):
        check_start(PLANS[Operation.FAILBACK], ReplicaVmState.REPLICATING, vm="web01", busy_session="")
    with pytest.raises(FailedPrecondition, match="no failover; next: commit-failback or undo-failback"):
        check_start(PLANS[Operation.FAILOVER], ReplicaVmState.FAILED_BACK, vm="web01", busy_session="")
    assert Operation.from_proto(Operation.STOP_TEST.to_proto()) is Operation.STOP_TEST


# ---- failover ----


async def test_failover_mounts_registers_and_starts_the_newest_point(ow: OpsWorld) -> None:
    session = await run(ow, Operation.FAILOVER)
    assert session.state is SessionState.SUCCEEDED and session.kind is SessionKind.OPERATION
    (mount,) = live_mounts(ow)
    assert mount.point_id == ow.points[-1] and mount.kind == target_pb2.MOUNT_KIND_FAILOVER
    assert mount.layout == target_pb2.MOUNT_LAYOUT_LAYER and mount.replica_path == REPLICA
    (vm_id,) = ow.failover.running()
    spec = ow.failover.specs[vm_id]
    assert spec.name == "vm1_replica" and spec.folder == mount.folder and not spec.isolated
    assert [(d.disk_id, d.path, d.format) for d in spec.disks] == [
        ("disk0", "disk0.layer", DiskFormat.LAYER),
        ("disk1", "disk1.layer", DiskFormat.LAYER),
    ]
    assert spec.configuration == b'{"generation": 2}'
    assert [(n.source_switch, n.target_switch) for n in spec.networks] == [("LAN", "DR-LAN")]
    rv = await replica_vm(ow)
    assert rv.state is ReplicaVmState.FAILED_OVER and rv.point_id == ow.points[-1] and rv.mount_id == mount.mount_id
    assert rv.running_vm_id == vm_id and rv.host_id == ow.failover_host_id and rv.busy_session_id == ""
    (row,) = await op_rows(ow, session.id)
    assert row.state is OperationStepState.DONE and row.step == "record" and row.point_id == ow.points[-1]


async def test_failover_to_an_older_point_mounts_that_point(ow: OpsWorld) -> None:
    session = await run(ow, Operation.FAILOVER, point=f"jobs/{ow.job_id}/restorePoints/{ow.points[0]}")
    (mount,) = live_mounts(ow)
    assert mount.point_id == ow.points[0]
    (row,) = await op_rows(ow, session.id)
    assert row.point_id == ow.points[0] and row.bytes_copied == 4096


async def test_a_second_failover_and_an_undo_without_failover_are_refused(ow: OpsWorld) -> None:
    with pytest.raises(FailedPrecondition, match="is not failed over: no undo failover"):
        await ow.ops.start(ow.job_id, Operation.UNDO_FAILOVER, [["vm1"]], OperationRequest())
    await run(ow, Operation.FAILOVER)
    with pytest.raises(FailedPrecondition, match="is failed over already"):
        await ow.ops.start(ow.job_id, Operation.FAILOVER, [["vm1"]], OperationRequest())
    assert len(live_mounts(ow)) == 1


async def test_failover_of_a_vm_a_session_is_replicating_is_refused(ow: OpsWorld) -> None:
    async with ow.w.journal.write() as db:
        s = Session(job_id=ow.job_id, state=SessionState.RUNNING)
        db.add(s)
        await db.flush()
        db.add(SessionVm(session_id=s.id, vm_id="vm1", vm_name="vm1", state="transferring"))
    with pytest.raises(FailedPrecondition, match=r"being replicated now .*vmrepl job stop job1"):
        await ow.ops.start(ow.job_id, Operation.FAILOVER, [["vm1"]], OperationRequest())
    # A test failover runs while the session goes on.
    session = await run(ow, Operation.TEST_FAILOVER)
    assert session.state is SessionState.SUCCEEDED


async def test_failover_without_a_failover_host_is_refused_naming_the_setting(ow: OpsWorld) -> None:
    from controller.db.models import Job

    async with ow.w.journal.write() as db:
        job = await db.get(Job, ow.job_id)
        assert job is not None
        job.failover_host_id = None
    with pytest.raises(FailedPrecondition, match="no failover_host"):
        await ow.ops.start(ow.job_id, Operation.FAILOVER, [["vm1"]], OperationRequest())


async def test_a_point_retention_is_about_to_delete_is_refused_and_bad_requests_too(ow: OpsWorld) -> None:
    await ow.add_point()  # four points, three kept: the oldest goes at the next session
    with pytest.raises(FailedPrecondition, match="retention deletes it"):
        await ow.ops.start(ow.job_id, Operation.FAILOVER, [["vm1"]], OperationRequest(point=ow.points[0]))
    with pytest.raises(NotFound, match="no restore point nope"):
        await ow.ops.start(ow.job_id, Operation.FAILOVER, [["vm1"]], OperationRequest(point="nope"))
    with pytest.raises(NotFound, match="no replica of a VM 'ghost'"):
        await ow.ops.start(ow.job_id, Operation.FAILOVER, [["ghost"]], OperationRequest())
    with pytest.raises(InvalidArgument, match="name at least one VM"):
        await ow.ops.start(ow.job_id, Operation.FAILOVER, [[]], OperationRequest())
    async with ow.w.journal.read() as db:  # nothing was claimed by the refused calls
        assert await db.scalar(select(Session).where(Session.kind == SessionKind.OPERATION)) is None
        rv = await db.scalar(select(ReplicaVm))
        assert rv is None or (rv.state is ReplicaVmState.REPLICATING and not rv.busy_session_id)


async def test_a_failover_whose_start_fails_is_undone(ow: OpsWorld) -> None:
    ow.failover.faults.fail("start_vm")
    session = await run(ow, Operation.FAILOVER)
    assert session.state is SessionState.FAILED and "start: start_vm failed" in session.error
    (row,) = await op_rows(ow, session.id)
    assert row.state is OperationStepState.ROLLED_BACK
    assert not live_mounts(ow) and not ow.failover.specs
    rv = await replica_vm(ow)
    assert rv.state is ReplicaVmState.REPLICATING and rv.busy_session_id == ""


async def test_retention_and_sessions_leave_a_failed_over_vm_alone(ow: OpsWorld) -> None:
    from controller.engine.operations.holds import held_points, paused_vms

    await run(ow, Operation.FAILOVER, point=ow.points[0])
    async with ow.w.journal.read() as db:
        assert await held_points(db, ow.job_id, "vm1") == {ow.points[0]}
        pause = await paused_vms(db, ow.w.sc.session_id, ow.job_id)
    assert pause.skips("vm1") and "failed over: replication paused" in pause.paused["vm1"]


# ---- undo, permanent ----


async def test_undo_failover_stops_unregisters_and_unmounts(ow: OpsWorld) -> None:
    await run(ow, Operation.FAILOVER)
    session = await run(ow, Operation.UNDO_FAILOVER)
    assert session.state is SessionState.SUCCEEDED
    assert not live_mounts(ow) and not ow.failover.specs
    rv = await replica_vm(ow)
    assert rv.state is ReplicaVmState.REPLICATING and rv.mount_id == "" and rv.running_vm_id == ""
    assert ow.w.target.points[REPLICA] and not ow.w.target.deleted_replicas  # the replica is untouched


async def test_permanent_failover_flattens_deletes_the_replica_and_leaves_the_job(ow: OpsWorld) -> None:
    await run(ow, Operation.FAILOVER)
    (vm_id,) = ow.failover.running()
    before = len(ow.failover.faults.calls)
    session = await run(ow, Operation.PERMANENT_FAILOVER)
    assert session.state is SessionState.SUCCEEDED, session.error
    calls = [c for c, _ in ow.w.target.mount_calls]
    assert calls[-3:] == ["flatten_mount", "delete_replica", "unmount_point"]
    assert not live_mounts(ow)  # the flattened mount's record dropped last: the folder is the VM's now
    assert ow.failover.running() == [vm_id]  # stopped for the flatten, running again
    host = ow.failover.faults.calls[before:]
    # The file host's merge comes after the flatten (its vm.toml then names the plain images), with the VM off.
    assert host.index(("stop_vm", vm_id)) < host.index(("merge_vm_disks", vm_id)) < host.index(("start_vm", vm_id))
    async with ow.w.journal.read() as db:
        assert not list(await db.scalars(select(RestorePoint).where(RestorePoint.vm_id == "vm1")))
        assert not list(await db.scalars(select(JobVm).where(JobVm.job_id == ow.job_id)))
    assert (await replica_vm(ow)).state is ReplicaVmState.PERMANENT


async def test_a_permanent_failover_run_again_after_its_unmount_answer_was_lost_finishes(ow: OpsWorld) -> None:
    """The target dropped the flattened mount's record but its answer was lost: the VM is left FAILED, and
    running the operation again finds the mount and the replica gone and finishes (not stuck at flatten)."""
    from tests.support.agents import rpc_error

    await run(ow, Operation.FAILOVER)
    ow.w.target.mount_faults["unmount_point"] = [rpc_error(grpc.StatusCode.UNAVAILABLE, "connection reset")]
    assert (await run(ow, Operation.PERMANENT_FAILOVER)).state is SessionState.FAILED
    assert (await replica_vm(ow)).state is ReplicaVmState.FAILED_OVER
    for mount in ow.w.target.mounts.values():  # what the target did before its answer was lost
        mount.state = target_pb2.MOUNT_STATE_GONE
    session = await run(ow, Operation.PERMANENT_FAILOVER)
    assert session.state is SessionState.SUCCEEDED, session.error
    assert (await replica_vm(ow)).state is ReplicaVmState.PERMANENT and ow.failover.running()


async def test_a_permanent_failover_refuses_a_vanished_mount_while_the_replica_has_points(ow: OpsWorld) -> None:
    await run(ow, Operation.FAILOVER)
    for mount in ow.w.target.mounts.values():  # removed by hand: the layers were never merged
        mount.state = target_pb2.MOUNT_STATE_GONE
    session = await run(ow, Operation.PERMANENT_FAILOVER)
    assert session.state is SessionState.FAILED and "NOT_FOUND" in session.error, session.error
    assert not ow.w.target.deleted_replicas


# ---- planned failover ----


async def test_planned_failover_shuts_the_source_down_replicates_once_more_and_fails_over_to_that_point(
    ow: OpsWorld,
) -> None:
    session = await run(ow, Operation.PLANNED_FAILOVER)
    assert session.state is SessionState.SUCCEEDED, session.error
    assert ow.source.power["vm1"] is PowerState.OFF
    (mount,) = live_mounts(ow)
    assert mount.point_id == ow.points[-1] == (await replica_vm(ow)).point_id  # the last incremental's point


async def test_a_planned_failover_whose_mount_fails_starts_the_source_again(ow: OpsWorld) -> None:
    import grpc

    from tests.support.agents import rpc_error

    ow.w.target.mount_faults["mount_point"] = [rpc_error(grpc.StatusCode.FAILED_PRECONDITION, "vm_root is not set")]
    session = await run(ow, Operation.PLANNED_FAILOVER)
    assert session.state is SessionState.FAILED and "vm_root is not set" in session.error
    assert ow.source.power["vm1"] is PowerState.RUNNING
    assert (await replica_vm(ow)).state is ReplicaVmState.REPLICATING


# ---- test failover ----


async def test_test_failover_runs_isolated_and_stop_test_removes_it(ow: OpsWorld) -> None:
    session = await run(ow, Operation.TEST_FAILOVER, time_limit_seconds=600)
    assert session.state is SessionState.SUCCEEDED
    (mount,) = live_mounts(ow)
    assert mount.kind == target_pb2.MOUNT_KIND_TEST
    (vm_id,) = ow.failover.running()
    assert ow.failover.specs[vm_id].isolated and not ow.failover.specs[vm_id].networks
    assert (await replica_vm(ow)).state is ReplicaVmState.REPLICATING  # replication goes on
    async with ow.w.journal.read() as db:
        (test,) = list(await db.scalars(select(TestFailover)))
    assert dt.timedelta(seconds=590) < test.deadline - now() <= dt.timedelta(seconds=600)
    with pytest.raises(FailedPrecondition, match=r"has a test failover running .*`vmrepl replica stop-test job1 --vm"):
        await ow.ops.start(ow.job_id, Operation.TEST_FAILOVER, [["vm1"]], OperationRequest())
    stop = await run(ow, Operation.STOP_TEST)
    assert stop.state is SessionState.SUCCEEDED and not live_mounts(ow) and not ow.failover.specs
    async with ow.w.journal.read() as db:
        assert not list(await db.scalars(select(TestFailover)))
    with pytest.raises(FailedPrecondition, match="no test failover"):
        await ow.ops.start(ow.job_id, Operation.STOP_TEST, [["vm1"]], OperationRequest())


async def test_a_test_failover_is_stopped_at_its_deadline(ow: OpsWorld) -> None:
    await run(ow, Operation.TEST_FAILOVER, time_limit_seconds=60)
    await ow.ops.expire_tests()  # not yet
    assert live_mounts(ow)
    ow.ops.clock = lambda: now() + dt.timedelta(seconds=61)
    await ow.ops.expire_tests()
    async with ow.w.journal.read() as db:
        (stop,) = list(await db.scalars(select(Session).where(Session.operation == "stop_test")))
    await settle(ow.ops, stop.id)
    assert not live_mounts(ow) and not ow.failover.specs
    await ow.ops.expire_tests()  # nothing left to stop
    async with ow.w.journal.read() as db:
        assert len(list(await db.scalars(select(Session).where(Session.operation == "stop_test")))) == 1


# ---- failback ----


async def test_failback_needs_the_original_off_then_commit_resumes_replication(ow: OpsWorld) -> None:
    await run(ow, Operation.FAILOVER)
    with pytest.raises(FailedPrecondition, match="the original VM vm1 is running"):
        await ow.ops.start(ow.job_id, Operation.FAILBACK, [["vm1"]], OperationRequest())
    assert (await replica_vm(ow)).state is ReplicaVmState.FAILED_OVER and ow.failover.running()
    # Started between the call's check and the step's: the step refuses it, and nothing changed.
    ow.source.power["vm1"] = PowerState.OFF
    session = await ow.ops.start(ow.job_id, Operation.FAILBACK, [["vm1"]], OperationRequest())
    ow.source.power["vm1"] = PowerState.RUNNING
    await settle(ow.ops, session.id)
    session = await ow.w.journal.load(Session, session.id)
    assert session.state is SessionState.FAILED and "the original VM vm1 is running" in session.error
    assert (await replica_vm(ow)).state is ReplicaVmState.FAILED_OVER and ow.failover.running()
    ow.source.power["vm1"] = PowerState.OFF
    session = await run(ow, Operation.FAILBACK)
    assert session.state is SessionState.SUCCEEDED, session.error
    assert ow.source.power["vm1"] is PowerState.RUNNING and not ow.failover.running()
    (row,) = await op_rows(ow, session.id)
    assert (row.bytes_read, row.bytes_sent, row.blocks_differing) == (8 << 20, 1 << 20, 1)
    assert (await replica_vm(ow)).state is ReplicaVmState.FAILED_BACK and ow.reverse.state == "finished"
    session = await run(ow, Operation.COMMIT_FAILBACK)
    assert session.state is SessionState.SUCCEEDED, session.error
    assert not live_mounts(ow) and not ow.failover.specs
    assert (await replica_vm(ow)).state is ReplicaVmState.REPLICATING
    async with ow.w.journal.read() as db:  # the next session compares digests
        assert {p.reference for p in await db.scalars(select(RestorePoint))} == {""}


async def test_a_failback_whose_transfer_fails_rolls_the_original_back_and_restarts_the_replica_vm(
    ow: OpsWorld,
) -> None:
    await run(ow, Operation.FAILOVER)
    ow.source.power["vm1"] = PowerState.OFF
    ow.reverse.faults.fail("transfer")
    session = await run(ow, Operation.FAILBACK)
    assert session.state is SessionState.FAILED
    (row,) = await op_rows(ow, session.id)
    assert row.state is OperationStepState.ROLLED_BACK
    assert ow.reverse.state == "rolled back" and ow.failover.running()
    assert (await replica_vm(ow)).state is ReplicaVmState.FAILED_OVER


async def test_undo_failback_stops_the_original_and_starts_the_replica_vm(ow: OpsWorld) -> None:
    await run(ow, Operation.FAILOVER)
    ow.source.power["vm1"] = PowerState.OFF
    await run(ow, Operation.FAILBACK)
    session = await run(ow, Operation.UNDO_FAILBACK)
    assert session.state is SessionState.SUCCEEDED, session.error
    assert ow.source.power["vm1"] is PowerState.OFF and ow.failover.running()
    assert (await replica_vm(ow)).state is ReplicaVmState.FAILED_OVER


async def test_groups_run_in_order_and_a_failed_group_stops_the_rest(tmp_path: Path) -> None:
    ow = await make_ops_world(tmp_path, vms={"vm1": ("disk0",), "vm2": ("disk0",), "vm3": ("disk0",)})
    try:
        for vm in ("vm1", "vm2", "vm3"):
            await ow.add_point(vm)
        ow.failover.faults.fail("register_vm")
        session = await ow.ops.start(ow.job_id, Operation.FAILOVER, [["vm1"], ["vm2", "vm3"]], OperationRequest())
        await settle(ow.ops, session.id)
        rows = {r.vm_id: r for r in await op_rows(ow, session.id)}
        assert rows["vm1"].state is OperationStepState.ROLLED_BACK and "register" in rows["vm1"].error
        assert rows["vm2"].state is OperationStepState.ROLLED_BACK and rows["vm2"].error.startswith("not run")
        for vm in ("vm1", "vm2", "vm3"):
            rv = await replica_vm(ow, vm)
            assert rv.state is ReplicaVmState.REPLICATING and not rv.busy_session_id
    finally:
        await ow.w.close()


# ---- replication around operations ----


async def test_a_replication_session_skips_a_failed_over_vm(ow: OpsWorld) -> None:
    from controller.engine.session import SessionRun

    await run(ow, Operation.FAILOVER)
    async with ow.w.journal.write() as db:
        s = await db.get(Session, ow.w.sc.session_id)
        assert s is not None
        s.state = SessionState.RUNNING
    await SessionRun(ow.w.parts, ow.w.sc).run()
    async with ow.w.journal.read() as db:
        assert not list(await db.scalars(select(SessionVm).where(SessionVm.session_id == ow.w.sc.session_id)))
    assert not ow.w.target.prepared  # nothing of the VM was written


async def test_retention_keeps_a_point_a_test_failover_holds(ow: OpsWorld) -> None:
    import asyncio

    from controller.engine.session import VmRun

    await run(ow, Operation.TEST_FAILOVER, point=ow.points[0])
    rows = await ow.w.plan()
    await asyncio.wait_for(VmRun(ow.w.parts, ow.w.sc, rows["vm1"]).run(), 30)
    async with ow.w.journal.read() as db:
        kept = {p.id for p in await db.scalars(select(RestorePoint))}
    # Three kept (keep = 3) besides the held one, which retention would have deleted now.
    assert ow.points[0] in kept and len(kept) == 4 and not ow.w.target.deleted


async def test_a_hyperv_failover_host_gets_vhdx_disks_by_their_host_paths_and_merges_when_permanent(
    ow: OpsWorld,
) -> None:
    from controller.db.models import Host

    async with ow.w.journal.write() as db:
        host = await db.get(Host, ow.failover_host_id)
        assert host is not None
        host.provider = "hyperv"
    await run(ow, Operation.FAILOVER)
    (mount,) = live_mounts(ow)
    assert mount.layout == target_pb2.MOUNT_LAYOUT_VHDX
    (vm_id,) = ow.failover.running()
    spec = ow.failover.specs[vm_id]
    assert spec.folder == mount.host_folder and spec.folder.startswith("D:\\vms\\")
    assert [(d.path, d.format) for d in spec.disks] == [
        (f"{mount.host_folder}\\disk0.vhdx", DiskFormat.VHDX),
        (f"{mount.host_folder}\\disk1.vhdx", DiskFormat.VHDX),
    ]
    assert (await replica_vm(ow)).folder == mount.host_folder
    session = await run(ow, Operation.PERMANENT_FAILOVER)
    assert session.state is SessionState.SUCCEEDED, session.error
    calls = ow.failover.faults.calls
    assert calls.index(("shutdown_vm", vm_id)) < calls.index(("merge_vm_disks", vm_id)), calls  # off to merge
    assert ("stop_vm", vm_id) not in calls, "shut down cleanly, never powered off"
    assert ow.failover.running() == [vm_id]  # started again
    assert [c for c, _ in ow.w.target.mount_calls][-3:] == ["flatten_mount", "delete_replica", "unmount_point"]
    assert not live_mounts(ow)


async def test_a_hyperv_failover_host_needs_the_targets_host_path(ow: OpsWorld) -> None:
    from controller.db.models import Host

    async with ow.w.journal.write() as db:
        host = await db.get(Host, ow.failover_host_id)
        assert host is not None
        host.provider = "hyperv"
    real = ow.w.target.mount_point

    async def no_host_path(request: target_pb2.MountPointRequest) -> target_pb2.Mount:
        mount = await real(request)
        mount.host_folder = ""
        return mount

    ow.w.target.mount_point = no_host_path  # type: ignore[method-assign]
    session = await run(ow, Operation.FAILOVER)
    assert session.state is SessionState.FAILED and "no vm_root_host_path" in session.error
    assert not live_mounts(ow) and (await replica_vm(ow)).state is ReplicaVmState.REPLICATING


async def test_permanent_failover_can_make_a_job_replicating_the_vm_back(ow: OpsWorld) -> None:
    from controller.db.models import Job

    await run(ow, Operation.FAILOVER)
    (vm_id,) = ow.failover.running()
    with pytest.raises(AlreadyExists, match="jobs/job1 exists already"):
        await ow.ops.start(
            ow.job_id, Operation.PERMANENT_FAILOVER, [["vm1"]], OperationRequest(replicate_back_job="job1")
        )
    session = await run(ow, Operation.PERMANENT_FAILOVER, replicate_back_job="web-back")
    assert session.state is SessionState.SUCCEEDED, session.error
    async with ow.w.journal.read() as db:
        back = await db.scalar(select(Job).where(Job.name == "web-back"))
        job = await db.get(Job, ow.job_id)
    assert back is not None and job is not None
    assert back.host_id == ow.failover_host_id and back.target_id == job.target_id
    assert back.replica_root == "jobs/web-back" and [v.vm_ref for v in back.vms] == [vm_id]
    assert back.restore_points_to_keep == job.restore_points_to_keep and back.schedule == {}


async def test_an_operation_session_notifies_the_jobs_webhook(ow: OpsWorld) -> None:
    from controller.db.enums import Notification
    from controller.db.models import Job

    async with ow.w.journal.write() as db:
        job = await db.get(Job, ow.job_id)
        assert job is not None
        job.webhook = {"sealed_url": "sealed", "shown_url": "https://hooks.example/…", "failures_only": False}
    session = await run(ow, Operation.TEST_FAILOVER)
    assert session.notification is Notification.PENDING


async def test_a_permanent_failover_waits_for_the_vms_test_failover_to_stop(ow: OpsWorld) -> None:
    await run(ow, Operation.FAILOVER)
    await run(ow, Operation.TEST_FAILOVER, point=ow.points[0])
    with pytest.raises(FailedPrecondition, match="has a test failover running"):
        await ow.ops.start(ow.job_id, Operation.PERMANENT_FAILOVER, [["vm1"]], OperationRequest())
    await run(ow, Operation.STOP_TEST)
    assert (await run(ow, Operation.PERMANENT_FAILOVER)).state is SessionState.SUCCEEDED
