"""A failback to a new location (StartReplicaOperationRequest.failback_host), its commit and its undo, in one
process with fakes (tests.support.operations): the steps and what they ask of the hosts and the reverse
transfer; the refusals at the call; and a controller killed right after every committed change, then started
again: each ends as it should, no VM, image or claim left behind, never two of anything."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select

from controller.db.enums import OperationStepState, ReplicaVmState, SessionKind, SessionState
from controller.db.models import Host, Job, JobVm, OperationVm, ReplicaVm, Session
from controller.engine.operations.context import OperationRequest
from controller.engine.operations.plans import Operation
from controller.engine.operations.service import Operations
from tests.support.operations import CrashingJournal, Killed, OpsWorld, PowerHost, make_ops_world, settle
from vmrepl.errors import FailedPrecondition, InvalidArgument, NotFound
from vmrepl.v1 import target_pb2


@dataclass
class World:
    ow: OpsWorld
    new: PowerHost
    new_host_id: str
    folder: Path


async def make(path: Path, *, vms: dict[str, tuple[str, ...]] | None = None, hyperv: str = "") -> World:
    path.mkdir(parents=True, exist_ok=True)
    ow = await make_ops_world(path, vms=vms)
    await ow.add_point(age_seconds=20)
    new = PowerHost()
    folder = path / "newhost"
    async with ow.w.journal.write() as db:
        host = Host(name="newhost", provider="file", address=str(folder))
        db.add(host)
        if hyperv:
            db.add(Host(name=hyperv, provider="hyperv", address="hv1"))
        await db.flush()
        new_id = host.id
    ow.w.parts.providers.by_host[new_id] = new  # type: ignore[attr-defined]
    return World(ow, new, new_id, folder)


async def run(ops: Operations, w: World, op: Operation, request: OperationRequest | None = None) -> Session:
    session = await ops.start(w.ow.job_id, op, [["vm1"]], request or OperationRequest())
    await settle(ops, session.id)
    return session


async def failed_over(w: World) -> None:
    await run(w.ow.ops, w, Operation.FAILOVER)


def to_new(w: World) -> OperationRequest:
    return OperationRequest(failback_host=f"hosts/{w.new_host_id}")


async def rv(w: World) -> ReplicaVm:
    async with w.ow.w.journal.read() as db:
        row = await db.scalar(select(ReplicaVm).where(ReplicaVm.vm_id == "vm1"))
    assert row is not None
    return row


async def test_failback_to_a_new_location_makes_writes_registers_and_starts_a_new_vm(tmp_path: Path) -> None:
    w = await make(tmp_path)
    try:
        await failed_over(w)
        session = await run(w.ow.ops, w, Operation.FAILBACK, to_new(w))
        async with w.ow.w.journal.read() as db:
            row = await db.scalar(select(OperationVm).where(OperationVm.session_id == session.id))
        assert row is not None and row.state is OperationStepState.DONE, row and row.error
        assert (await rv(w)).state is ReplicaVmState.FAILED_BACK
        assert w.ow.source.faults.calls == []  # the original VM is never asked
        assert w.ow.failover.running() == []  # the failed-over VM shut down
        assert w.new.running() == [row.data["new_vm_id"]]
        spec = w.new.specs[row.data["new_vm_id"]]
        assert spec.name == "vm1" and spec.folder == row.data["new_folder"] and spec.configuration
        assert [(d.disk_id, d.path) for d in spec.disks] == [("disk0", "disk0.raw"), ("disk1", "disk1.raw")]
        assert row.data["original_disks"] == [
            ["disk0", f"{w.folder}/{row.data['new_folder']}/disk0.raw", "raw"],
            ["disk1", f"{w.folder}/{row.data['new_folder']}/disk1.raw", "raw"],
        ]
        assert row.data["failback_path"] == f".failback/{w.ow.job_id}/vm1-{row.id[:12]}"  # one per attempt
        assert w.ow.reverse.faults.calls == [("transfer", row.data["failback_path"])]  # kept until commit
        assert w.ow.reverse.state == "transferred"
    finally:
        await w.ow.w.close()


async def test_commit_makes_the_new_vm_the_jobs_vm_on_its_host(tmp_path: Path) -> None:
    w = await make(tmp_path)
    try:
        await failed_over(w)
        await run(w.ow.ops, w, Operation.FAILBACK, to_new(w))
        await run(w.ow.ops, w, Operation.COMMIT_FAILBACK)
        new_vm = next(iter(w.new.specs))
        async with w.ow.w.journal.read() as db:
            job = await db.get(Job, w.ow.job_id)
            refs = list(await db.scalars(select(JobVm.vm_ref).where(JobVm.job_id == w.ow.job_id)))
        assert job is not None and job.host_id == w.new_host_id and refs == [new_vm]
        assert (await rv(w)).state is ReplicaVmState.PERMANENT  # the original left the job
        # Its name now means the new VM: the original's old points are never failed over by that name.
        with pytest.raises(FailedPrecondition, match="left the job"):
            await w.ow.ops.start(w.ow.job_id, Operation.FAILOVER, [["vm1"]], OperationRequest())
        assert w.ow.reverse.state == "finished" and w.ow.failover.specs == {}
        assert all(m.state == target_pb2.MOUNT_STATE_GONE for m in w.ow.w.target.mounts.values())
        assert w.new.running() == [new_vm]
    finally:
        await w.ow.w.close()


async def test_undo_removes_the_new_vm_and_its_images_and_runs_the_failed_over_vm_again(tmp_path: Path) -> None:
    w = await make(tmp_path)
    try:
        await failed_over(w)
        await run(w.ow.ops, w, Operation.FAILBACK, to_new(w))
        await run(w.ow.ops, w, Operation.UNDO_FAILBACK)
        assert (await rv(w)).state is ReplicaVmState.FAILED_OVER
        assert w.new.specs == {} and w.ow.reverse.state == "discarded"
        assert len(w.ow.failover.running()) == 1
        # Then a failback to the original works as before.
        await run(w.ow.ops, w, Operation.UNDO_FAILOVER)
        assert (await rv(w)).state is ReplicaVmState.REPLICATING
    finally:
        await w.ow.w.close()


async def test_a_failing_start_undoes_the_failback_to_a_new_location(tmp_path: Path) -> None:
    w = await make(tmp_path)
    try:
        await failed_over(w)
        w.new.faults.fail("start_vm")
        await run(w.ow.ops, w, Operation.FAILBACK, to_new(w))
        assert (await rv(w)).state is ReplicaVmState.FAILED_OVER
        assert w.new.specs == {} and w.ow.reverse.state == "rolled back"
        assert len(w.ow.failover.running()) == 1
    finally:
        await w.ow.w.close()


async def test_refused_at_the_call(tmp_path: Path) -> None:
    w = await make(tmp_path, vms={"vm1": ("disk0",), "vm2": ("disk0",)}, hyperv="hv")
    try:
        await failed_over(w)
        ops = w.ow.ops
        with pytest.raises(FailedPrecondition, match="needs a job of its own"):
            await ops.start(w.ow.job_id, Operation.FAILBACK, [["vm1"]], to_new(w))
        with pytest.raises(FailedPrecondition, match="file hosts only"):
            await ops.start(w.ow.job_id, Operation.FAILBACK, [["vm1"]], OperationRequest(failback_host="hv"))
        with pytest.raises(NotFound):
            await ops.start(w.ow.job_id, Operation.FAILBACK, [["vm1"]], OperationRequest(failback_host="hosts/x"))
        with pytest.raises(InvalidArgument):
            await ops.start(w.ow.job_id, Operation.UNDO_FAILOVER, [["vm1"]], to_new(w))
        assert (await rv(w)).state is ReplicaVmState.FAILED_OVER and (await rv(w)).busy_session_id == ""
        # The job's own host: allowed with other VMs in the job (the job's reference changes, not its host).
        async with w.ow.w.journal.read() as db:
            job = await db.get(Job, w.ow.job_id)
        assert job is not None
        w.ow.w.parts.providers.by_host[job.host_id] = w.ow.source  # type: ignore[attr-defined]
        same = OperationRequest(failback_host=job.host_id)
        session = await ops.start(w.ow.job_id, Operation.FAILBACK, [["vm1"]], same)
        await settle(ops, session.id)
        assert (await rv(w)).state is ReplicaVmState.FAILED_BACK
    finally:
        await w.ow.w.close()


# ---- a controller killed after every committed change ----


@dataclass(frozen=True)
class Scenario:
    operation: Operation
    before: tuple[Operation, ...]
    ends: ReplicaVmState
    new_vms: int  # registered on the new host at the end (and running)
    failover_running: int
    reverse: str
    fault: str = ""


SCENARIOS = {
    "failback": Scenario(Operation.FAILBACK, (Operation.FAILOVER,), ReplicaVmState.FAILED_BACK, 1, 0, "transferred"),
    "failback-undone": Scenario(
        Operation.FAILBACK, (Operation.FAILOVER,), ReplicaVmState.FAILED_OVER, 0, 1, "rolled back", fault="start_vm"
    ),
    "commit": Scenario(
        Operation.COMMIT_FAILBACK,
        (Operation.FAILOVER, Operation.FAILBACK),
        ReplicaVmState.PERMANENT,
        1,
        0,
        "finished",
    ),
    "undo": Scenario(
        Operation.UNDO_FAILBACK, (Operation.FAILOVER, Operation.FAILBACK), ReplicaVmState.FAILED_OVER, 0, 1, "discarded"
    ),
}


async def _world(path: Path, s: Scenario) -> World:
    w = await make(path)
    for op in s.before:
        await run(w.ow.ops, w, op, to_new(w) if op is Operation.FAILBACK else None)
    if s.fault:
        w.new.faults.fail(s.fault)
    return w


async def _until_killed(ops: Operations, w: World, s: Scenario) -> None:
    request = to_new(w) if s.operation is Operation.FAILBACK else OperationRequest()
    with contextlib.suppress(Killed):
        session = await ops.start(w.ow.job_id, s.operation, [["vm1"]], request)
        await asyncio.wait_for(ops.wait(session.id), 30)
    for _ in range(50):
        await asyncio.sleep(0)


async def _recover(w: World) -> None:
    ops = w.ow.operations()
    await ops.recover()
    async with w.ow.w.journal.read() as db:
        ids = list(await db.scalars(select(Session.id).where(Session.kind == SessionKind.OPERATION)))
    for session_id in ids:
        await settle(ops, session_id)


async def _check(w: World, s: Scenario, label: str) -> None:
    async with w.ow.w.journal.read() as db:
        sessions = list(await db.scalars(select(Session).where(Session.kind == SessionKind.OPERATION)))
        rows = list(await db.scalars(select(OperationVm)))
        job = await db.get(Job, w.ow.job_id)
        refs = list(await db.scalars(select(JobVm.vm_ref).where(JobVm.job_id == w.ow.job_id)))
    assert all(x.state in (SessionState.SUCCEEDED, SessionState.FAILED) for x in sessions), label
    assert all(r.state in (OperationStepState.DONE, OperationStepState.ROLLED_BACK) for r in rows), (label, rows)
    state = await rv(w)
    assert state.state is s.ends and state.busy_session_id == "", (label, state.state)
    assert len(w.new.specs) == s.new_vms and len(w.new.running()) == s.new_vms, (label, w.new.specs)
    assert len(w.ow.failover.running()) == s.failover_running, (label, w.ow.failover.power)
    assert w.ow.reverse.state == s.reverse, label
    committed = s.operation is Operation.COMMIT_FAILBACK
    assert job is not None and (job.host_id == w.new_host_id) is committed, label
    assert refs == (list(w.new.specs) if committed else ["vm1"]), (label, refs)


async def _changes(path: Path, s: Scenario) -> int:
    w = await _world(path, s)
    try:
        journal = CrashingJournal(w.ow.w.journal, crash_at=0)
        await _until_killed(w.ow.operations(journal), w, s)
        await _check(w, s, "no crash")
        return journal.changes
    finally:
        await w.ow.w.close()


@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_a_crash_after_every_committed_change_resumes_or_rolls_back(tmp_path: Path, name: str) -> None:
    s = SCENARIOS[name]
    total = await _changes(tmp_path / "count", s)
    assert total >= 4
    for n in range(1, total + 1):
        w = await _world(tmp_path / f"crash{n}", s)
        try:
            await _until_killed(w.ow.operations(CrashingJournal(w.ow.w.journal, crash_at=n)), w, s)
            await _recover(w)
            await _check(w, s, f"killed after change {n} of {total}")
        finally:
            await w.ow.w.close()


async def test_a_commit_on_the_jobs_own_host_changes_the_vm_reference_only(tmp_path: Path) -> None:
    w = await make(tmp_path, vms={"vm1": ("disk0",), "vm2": ("disk0",)})
    try:
        await failed_over(w)
        async with w.ow.w.journal.read() as db:
            job = await db.get(Job, w.ow.job_id)
        assert job is not None
        home = job.host_id
        await run(w.ow.ops, w, Operation.FAILBACK, OperationRequest(failback_host=home))
        await run(w.ow.ops, w, Operation.COMMIT_FAILBACK)
        new_vm = next(v for v in w.ow.source.specs)
        async with w.ow.w.journal.read() as db:
            job = await db.get(Job, w.ow.job_id)
            refs = sorted(await db.scalars(select(JobVm.vm_ref).where(JobVm.job_id == w.ow.job_id)))
        assert job is not None and job.host_id == home
        assert refs == sorted([new_vm, "vm2"])
        assert (await rv(w)).state is ReplicaVmState.PERMANENT
    finally:
        await w.ow.w.close()
