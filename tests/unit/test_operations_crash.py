"""A controller killed right after each committed change of an operation (the journal's crash hook, in one
process: the change commits, then the run dies), then started again: every operation resumes or rolls back
to a consistent state: no mount, VM or claim left behind, never two of anything."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select

from controller.db.enums import OperationStepState, ReplicaVmState, SessionKind, SessionState
from controller.db.models import OperationVm, ReplicaVm, Session, TestFailover
from controller.engine.operations.context import OperationRequest
from controller.engine.operations.plans import Operation
from controller.engine.operations.service import Operations
from tests.support.operations import CrashingJournal, Killed, OpsWorld, make_ops_world, settle
from vmrepl.domain import PowerState
from vmrepl.v1 import target_pb2


@dataclass(frozen=True)
class Scenario:
    operation: Operation
    before: tuple[Operation, ...] = ()
    original_off: bool = False
    fault: str = ""  # a host call that fails once: the operation is undone
    ends: ReplicaVmState = ReplicaVmState.FAILED_OVER
    mounts: int = 1
    running: int = 1
    tests: int = 0
    registered: int | None = None  # VMs registered on the failover host at the end (default: one per mount)


SCENARIOS = {
    "failover": Scenario(Operation.FAILOVER),
    "failover-undone": Scenario(
        Operation.FAILOVER, fault="start_vm", ends=ReplicaVmState.REPLICATING, mounts=0, running=0
    ),
    "planned-failover": Scenario(Operation.PLANNED_FAILOVER),
    "undo-failover": Scenario(
        Operation.UNDO_FAILOVER, (Operation.FAILOVER,), ends=ReplicaVmState.REPLICATING, mounts=0, running=0
    ),
    # The VM stays, its mount's record goes (flattened: the folder is the VM's).
    "permanent": Scenario(
        Operation.PERMANENT_FAILOVER, (Operation.FAILOVER,), ends=ReplicaVmState.PERMANENT, mounts=0, registered=1
    ),
    "test-failover": Scenario(Operation.TEST_FAILOVER, ends=ReplicaVmState.REPLICATING, tests=1),
    "stop-test": Scenario(
        Operation.STOP_TEST, (Operation.TEST_FAILOVER,), ends=ReplicaVmState.REPLICATING, mounts=0, running=0
    ),
    "failback": Scenario(
        Operation.FAILBACK, (Operation.FAILOVER,), original_off=True, ends=ReplicaVmState.FAILED_BACK, running=0
    ),
    "failback-undone": Scenario(Operation.FAILBACK, (Operation.FAILOVER,), original_off=True, fault="start_original"),
    "commit-failback": Scenario(
        Operation.COMMIT_FAILBACK,
        (Operation.FAILOVER, Operation.FAILBACK),
        original_off=True,
        ends=ReplicaVmState.REPLICATING,
        mounts=0,
        running=0,
    ),
}


async def _world(path: Path, s: Scenario) -> OpsWorld:
    path.mkdir()
    ow = await make_ops_world(path)
    await ow.add_point(age_seconds=20)
    await ow.add_point(age_seconds=10)
    for op in s.before:
        if op is Operation.FAILBACK or (s.original_off and op is s.operation):
            ow.source.power["vm1"] = PowerState.OFF
        session = await ow.ops.start(ow.job_id, op, [["vm1"]], OperationRequest())
        await settle(ow.ops, session.id)
    if s.original_off:
        ow.source.power["vm1"] = PowerState.OFF
    if s.fault == "start_original":
        ow.source.faults.fail("start_vm")
    elif s.fault:
        ow.failover.faults.fail(s.fault)
    return ow


async def _run_until_killed(ops: Operations, ow: OpsWorld, s: Scenario) -> None:
    with contextlib.suppress(Killed):
        session = await ops.start(ow.job_id, s.operation, [["vm1"]], OperationRequest())
        await asyncio.wait_for(ops.wait(session.id), 30)
    for _ in range(50):  # let a dying run's task end
        await asyncio.sleep(0)


async def _recover(ow: OpsWorld) -> None:
    ops = ow.operations()
    await ops.recover()
    async with ow.w.journal.read() as db:
        ids = list(await db.scalars(select(Session.id).where(Session.kind == SessionKind.OPERATION)))
    for session_id in ids:
        await settle(ops, session_id)


async def _check(ow: OpsWorld, s: Scenario, label: str) -> None:
    async with ow.w.journal.read() as db:
        sessions = list(await db.scalars(select(Session).where(Session.kind == SessionKind.OPERATION)))
        rows = list(await db.scalars(select(OperationVm)))
        rv = await db.scalar(select(ReplicaVm).where(ReplicaVm.vm_id == "vm1"))
        tests = list(await db.scalars(select(TestFailover)))
    assert all(x.state in (SessionState.SUCCEEDED, SessionState.FAILED) for x in sessions), label
    assert all(r.state in (OperationStepState.DONE, OperationStepState.ROLLED_BACK) for r in rows), (label, rows)
    assert rv is not None and rv.state is s.ends and rv.busy_session_id == "", (label, rv and rv.state)
    live = [m for m in ow.w.target.mounts.values() if m.state != target_pb2.MOUNT_STATE_GONE]
    assert len(live) == s.mounts, (label, live)
    assert len(ow.failover.running()) == s.running, (label, ow.failover.power)
    registered = s.registered if s.registered is not None else (0 if s.mounts == 0 else 1)
    assert len(ow.failover.specs) == registered, (label, ow.failover.specs)
    assert len(tests) == s.tests, label


async def _changes(path: Path, s: Scenario) -> int:
    ow = await _world(path, s)
    try:
        journal = CrashingJournal(ow.w.journal, crash_at=0)
        await _run_until_killed(ow.operations(journal), ow, s)
        await _check(ow, s, "no crash")
        return journal.changes
    finally:
        await ow.w.close()


@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_a_crash_after_every_committed_change_resumes_or_rolls_back(tmp_path: Path, name: str) -> None:
    s = SCENARIOS[name]
    total = await _changes(tmp_path / "count", s)
    assert total >= 4
    for n in range(1, total + 1):
        ow = await _world(tmp_path / f"crash{n}", s)
        try:
            await _run_until_killed(ow.operations(CrashingJournal(ow.w.journal, crash_at=n)), ow, s)
            await _recover(ow)
            await _check(ow, s, f"killed after change {n} of {total}")
        finally:
            await ow.w.close()
