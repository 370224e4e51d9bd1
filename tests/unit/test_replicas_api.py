"""The replicas part of the API in one process: ListJobReplicas, RollbackJobReplica, ListJobRestorePoints'
new fields and the job's replica format, on the real database with the fake target behind the engine's
agents (sessions run by VmRun, as in test_vm_run)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.fernet import Fernet
from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import async_sessionmaker

from controller.api.replicas import REPLICA_CALLS, ReplicasApi
from controller.api.resources import jobs as jobs_res
from controller.api.sessions import SessionsApi
from controller.db.enums import ReplicaVmState, SessionKind, SessionState, TaskState, VmState
from controller.db.models import HeldCheckpoint, Job, JobVm, ReplicaVm, RestorePoint, Session, SessionVm, Task
from controller.db.secrets import SecretBox
from controller.engine.session import VmRun
from controller.engine.sessions import Engine
from tests.support.agents import RUNNING, Crash, FakeReplica, progress
from tests.support.engine import DISK_SIZE, World, make_world
from vmrepl.errors import FailedPrecondition, InvalidArgument
from vmrepl.v1 import common_pb2
from vmrepl.v1 import controller_pb2 as api

AT_POINT, EMPTY = common_pb2.REPLICA_STATE_AT_POINT, common_pb2.REPLICA_STATE_EMPTY
RESUMABLE = common_pb2.REPLICA_STATE_RESUMABLE


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code, self.message = code, message


class Context:
    """What handle_errors asks of a call's context."""

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}

    def peer(self) -> str:
        return "ipv4:127.0.0.1:5000"

    async def abort(self, code: grpc.StatusCode, message: str, trailing_metadata: Any = ()) -> None:
        raise Aborted(code, message)


class Api(ReplicasApi, SessionsApi):
    pass


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    w = await make_world(tmp_path, vms={"vm1": ("disk0", "disk1")}, target_retry_seconds=0.2)
    yield w
    await w.close()


def _api(w: World, tmp_path: Path) -> Api:
    return Api(
        journal=w.journal,
        reads=async_sessionmaker(w.db, expire_on_commit=False),
        engine=Engine(w.parts),
        secrets=SecretBox([Fernet.generate_key()]),
        live=w.parts.live,
        session_logs=tmp_path,
    )


async def _session(w: World, *, end: SessionState = SessionState.SUCCEEDED) -> SessionVm:
    """The world's session runs its VM, then ends in `end`."""
    rows = await w.plan()
    await asyncio.wait_for(VmRun(w.parts, w.sc, rows["vm1"]).run(), 30)
    async with w.journal.change("ended") as db:
        await db.execute(update(Session).where(Session.id == w.sc.session_id).values(state=end))
    return await w.vm_row(rows["vm1"])


async def _replicas(a: Api) -> list[api.JobReplica]:
    reply = await a.ListJobReplicas(api.ListJobReplicasRequest(parent="jobs/job1"), Context())
    return list(reply.replicas)


async def test_a_replica_at_its_point_lists_the_points_as_the_target_holds_them(world: World, tmp_path: Path) -> None:
    row = await _session(world)
    (r,) = await _replicas(_api(world, tmp_path))
    assert (r.vm_id, r.vm_name, r.state, r.error) == ("vm1", "vm1", AT_POINT, "")
    assert r.base_point == f"jobs/job1/restorePoints/{row.restore_point_id}"
    (p,) = r.restore_points
    assert p.name == r.base_point and p.session == f"sessions/{world.sc.session_id}" and p.restorable
    assert (p.vm_name, p.size_bytes, p.consistency) == ("vm1", 2 * DISK_SIZE, common_pb2.CONSISTENCY_CRASH)
    assert [(d.disk_id, d.disk_size, d.format) for d in p.disks] == [
        ("disk0", DISK_SIZE, common_pb2.DISK_FORMAT_RAW),
        ("disk1", DISK_SIZE, common_pb2.DISK_FORMAT_RAW),
    ]


async def test_a_failback_transfer_and_a_vm_failed_over_permanently_are_no_replicas_of_the_job(
    world: World, tmp_path: Path
) -> None:
    await _session(world)
    async with world.journal.change("a failback's transfer, recorded under its operation session") as db:
        op = Session(job_id=world.sc.job.job_id, state=SessionState.SUCCEEDED, kind=SessionKind.OPERATION)
        db.add(op)
        await db.flush()
        db.add(SessionVm(session_id=op.id, vm_id="fo-vm", vm_name="vm1_replica", state=VmState.DONE))
        db.add(Task(session_id=op.id, vm_id="fo-vm", vm_name="vm1_replica", disk_id="disk0", state=TaskState.SUCCEEDED))
    a = _api(world, tmp_path)
    assert [r.vm_id for r in await _replicas(a)] == ["vm1"]
    async with world.journal.change("vm1 failed over permanently: its points gone, the VM out of the job") as db:
        db.add(ReplicaVm(job_id=world.sc.job.job_id, vm_id="vm1", vm_name="vm1", state=ReplicaVmState.PERMANENT))
        await db.execute(delete(RestorePoint).where(RestorePoint.job_id == world.sc.job.job_id))
        await db.execute(delete(JobVm).where(JobVm.job_id == world.sc.job.job_id))
    assert await _replicas(a) == []
    async with world.journal.change("the job names it again") as db:
        db.add(JobVm(job_id=world.sc.job.job_id, vm_ref="vm1"))
    assert [(r.vm_id, r.state) for r in await _replicas(a)] == [("vm1", AT_POINT)]


async def test_a_held_session_shows_its_replica_resumable_and_a_rollback_returns_it(
    world: World, tmp_path: Path
) -> None:
    world.proxy.script = lambda r: [progress(RUNNING, DISK_SIZE // 2), Crash()]
    row = await _session(world, end=SessionState.INCOMPLETE)
    assert row.state is VmState.HELD
    a = _api(world, tmp_path)
    (r,) = await _replicas(a)
    assert (r.state, r.session) == (RESUMABLE, f"sessions/{world.sc.session_id}")
    back = await a.RollbackJobReplica(api.RollbackJobReplicaRequest(job="jobs/job1", vm="vm1"), Context())
    assert back.state == EMPTY and back.rolled_back_session == f"sessions/{world.sc.session_id}"
    assert back.HasField("rolled_back_time") and world.target.rollbacks == [("jobs/job1/vm1", world.sc.session_id)]
    # The progress kept for the resume is gone, so is the hold: no session "continues" what was rolled back.
    async with world.journal.read() as db:
        assert await db.scalar(select(HeldCheckpoint)) is None


async def test_a_rollback_is_refused_while_a_session_of_the_job_runs(world: World, tmp_path: Path) -> None:
    await world.plan()  # make_world's session is running, and has planned the VM
    with pytest.raises(Aborted) as refused:
        await _api(world, tmp_path).RollbackJobReplica(
            api.RollbackJobReplicaRequest(job="jobs/job1", vm="vm1"), Context()
        )
    assert refused.value.code is grpc.StatusCode.FAILED_PRECONDITION and "running session" in refused.value.message


async def test_no_session_of_the_job_starts_while_its_replica_is_rolled_back(world: World, tmp_path: Path) -> None:
    await _session(world)
    a = _api(world, tmp_path)
    world.target.replica_gate = asyncio.Event()
    rollback = asyncio.create_task(
        a.RollbackJobReplica(api.RollbackJobReplicaRequest(job="jobs/job1", vm="vm1"), Context())
    )
    await asyncio.wait_for(world.target.at_gate(1), 10)
    with pytest.raises(FailedPrecondition, match="being rolled back"):
        await a.engine.start_job(world.sc.job.job_id)
    world.target.replica_gate.set()
    assert (await rollback).state == AT_POINT
    async with world.journal.read() as db:
        assert not list(await db.scalars(select(Session).where(Session.state == SessionState.RUNNING)))


@pytest.mark.parametrize(("vm", "code"), [("", grpc.StatusCode.INVALID_ARGUMENT), ("vm9", grpc.StatusCode.NOT_FOUND)])
async def test_a_rollback_names_a_vm_of_the_job(world: World, tmp_path: Path, vm: str, code: grpc.StatusCode) -> None:
    await _session(world)
    with pytest.raises(Aborted) as refused:
        await _api(world, tmp_path).RollbackJobReplica(api.RollbackJobReplicaRequest(job="jobs/job1", vm=vm), Context())
    assert refused.value.code is code


async def test_a_target_down_gives_each_vm_its_error_never_a_failed_call(world: World, tmp_path: Path) -> None:
    await _session(world)
    world.target.up = False
    (r,) = await _replicas(_api(world, tmp_path))
    assert r.state == common_pb2.REPLICA_STATE_UNSPECIFIED and "target target cannot be asked now" in r.error
    assert "UNAVAILABLE" in r.error and not r.restore_points


async def test_a_target_answering_an_id_that_is_no_plain_name_is_refused_for_that_vm(
    world: World, tmp_path: Path
) -> None:
    await _session(world)
    world.target.points["jobs/job1/vm1"][0].id = "../../etc"
    (r,) = await _replicas(_api(world, tmp_path))
    assert "is not a plain name" in r.error and not r.restore_points


async def test_many_vms_are_asked_a_few_at_a_time(tmp_path: Path) -> None:
    vms: dict[str, tuple[str, ...]] = {f"vm{i:02}": ("disk0",) for i in range(REPLICA_CALLS * 2 + 1)}
    w = await make_world(tmp_path, vms=vms)
    try:
        rows = await w.plan()
        for vm_id in rows:  # each VM planned, and its replica on the target
            w.target.replicas[f"jobs/job1/{vm_id}"] = FakeReplica()
        w.target.replica_gate = asyncio.Event()
        listing = asyncio.create_task(_replicas(_api(w, tmp_path)))
        await asyncio.wait_for(w.target.at_gate(REPLICA_CALLS), 10)
        for _ in range(20):  # turns for the loop: a call past the bound would reach the gate now
            await asyncio.sleep(0)
        assert w.target.in_flight == REPLICA_CALLS
        w.target.replica_gate.set()
        replicas = await listing
        assert [r.vm_id for r in replicas] == sorted(vms) and w.target.most_in_flight == REPLICA_CALLS
        assert {r.state for r in replicas} == {EMPTY}
    finally:
        await w.close()


async def test_list_job_restore_points_fills_the_new_fields_from_the_database(world: World, tmp_path: Path) -> None:
    row = await _session(world)
    world.target.up = False  # the database alone answers
    reply = await _api(world, tmp_path).ListJobRestorePoints(
        api.ListJobRestorePointsRequest(parent="jobs/job1"), Context()
    )
    (p,) = reply.restore_points
    assert p.name == f"jobs/job1/restorePoints/{row.restore_point_id}" and p.vm_name == "vm1"
    assert (p.size_bytes, p.consistency, p.restorable) == (2 * DISK_SIZE, common_pb2.CONSISTENCY_CRASH, False)
    assert [(d.disk_id, d.format) for d in p.disks] == [
        ("disk0", common_pb2.DISK_FORMAT_RAW),
        ("disk1", common_pb2.DISK_FORMAT_RAW),
    ]


# ---- the job's replica format -------------------------------------------------------------------------


async def _set_format(w: World, fmt: common_pb2.DiskFormat.ValueType) -> Job:
    async with w.journal.write() as db:
        job = await db.get(Job, w.sc.job.job_id)
        assert job is not None
        msg = api.Job(replica_format=fmt)
        await jobs_res.apply_job(db, msg, job, ["replica_format"], secrets=SecretBox([Fernet.generate_key()]))
    return job


async def test_a_jobs_replica_format_is_raw_vhdx_or_the_hosts_own_and_never_vhd(world: World) -> None:
    assert (await _set_format(world, common_pb2.DISK_FORMAT_VHDX)).replica_format == "vhdx"
    assert (await _set_format(world, common_pb2.DISK_FORMAT_UNSPECIFIED)).replica_format == ""
    with pytest.raises(InvalidArgument, match=r"job\.replica_format: VHD is not written as a replica"):
        await _set_format(world, common_pb2.DISK_FORMAT_VHD)
    with pytest.raises(InvalidArgument, match=r"job\.replica_format"):
        await _set_format(world, 77)  # type: ignore[arg-type]
    async with world.journal.read() as db:
        job = await db.get(Job, world.sc.job.job_id)
        assert job is not None
        msg = await jobs_res.job_msg(db, job)
    assert msg.replica_format == common_pb2.DISK_FORMAT_UNSPECIFIED


async def test_a_job_with_restore_points_keeps_its_replica_format(world: World) -> None:
    await _session(world)  # points in raw, the file host's own
    assert (await _set_format(world, common_pb2.DISK_FORMAT_RAW)).replica_format == "raw"  # the same format
    with pytest.raises(FailedPrecondition, match="formats are not converted, so it cannot become vhdx"):
        await _set_format(world, common_pb2.DISK_FORMAT_VHDX)
    async with world.journal.read() as db:
        job = await db.get(Job, world.sc.job.job_id)
    assert job is not None and job.replica_format == "raw"  # the refused change left nothing behind
