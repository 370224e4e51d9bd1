"""The controller's VerifyJobReplica and ExportRestorePoint in process: the real database and API section,
a fake target (tests.support.agents). The job, VM and point are resolved and checked before the target is
asked; the target's stream and errors are relayed."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.fernet import Fernet
from sqlalchemy import update
from sqlalchemy.ext.asyncio import async_sessionmaker

from controller.api.replica_reads import ReplicaReadsApi
from controller.db.enums import SessionState, VmState
from controller.db.models import Job, JobVm, RestorePoint, Session, SessionVm
from controller.db.secrets import SecretBox
from controller.engine.sessions import Engine
from tests.support.agents import rpc_error
from tests.support.engine import World, make_world
from tests.support.points import Aborted, FakeContext
from vmrepl.extent import MiB
from vmrepl.v1 import common_pb2, target_pb2
from vmrepl.v1 import controller_pb2 as api

REPLICA = "jobs/job1/vm1"
DATA = bytes(MiB) + b"\x07" * MiB + bytes(MiB)


async def add_point(w: World, point_id: str, *, vm_id: str = "vm1", job_id: str = "", hours: int = 0) -> None:
    async with w.journal.write() as db:
        db.add(
            RestorePoint(
                id=point_id,
                job_id=job_id or w.sc.job.job_id,
                vm_id=vm_id,
                session_id=w.sc.session_id,
                created_at=dt.datetime(2026, 1, 1, tzinfo=dt.UTC) + dt.timedelta(hours=hours),
            )
        )
    w.target.points.setdefault(f"jobs/job1/{vm_id}", []).append(target_pb2.RestorePoint(id=point_id))


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[tuple[World, ReplicaReadsApi]]:
    """Job1 with VM vm1 (named "VM One" by its session), which ended; points rp1 and the newer rp2."""
    w = await make_world(tmp_path)
    async with w.journal.write() as db:
        await db.execute(update(Session).values(state=SessionState.SUCCEEDED))
        db.add(SessionVm(session_id=w.sc.session_id, vm_id="vm1", vm_name="VM One", state=VmState.DONE))
    await add_point(w, "rp1")
    await add_point(w, "rp2", hours=1)
    w.target.point_disks[(REPLICA, "rp1", "disk0")] = DATA
    service = ReplicaReadsApi(
        journal=w.journal,
        reads=async_sessionmaker(w.db, expire_on_commit=False),
        engine=Engine(w.parts),
        secrets=SecretBox([Fernet.generate_key()]),
        live=w.parts.live,
        session_logs=tmp_path / "logs",
    )
    try:
        yield w, service
    finally:
        await w.close()


async def verify(service: ReplicaReadsApi, **fields: Any) -> list[common_pb2.VerifyProgress]:
    request = api.VerifyJobReplicaRequest(**{"job": "jobs/job1", **fields})
    return [m async for m in service.VerifyJobReplica(request, FakeContext())]


async def export(service: ReplicaReadsApi, **fields: Any) -> list[common_pb2.DiskChunk]:
    request = api.ExportRestorePointRequest(**{"job": "jobs/job1", "vm": "vm1", "disk": "disk0", **fields})
    return [c async for c in service.ExportRestorePoint(request, FakeContext())]


async def refused(call: Any) -> Aborted:
    with pytest.raises(Aborted) as e:
        await call
    return e.value


async def test_verify_resolves_the_vm_by_id_name_or_alone_and_the_point_newest_by_default(
    world: tuple[World, ReplicaReadsApi],
) -> None:
    w, service = world
    done = common_pb2.VerifyProgress(disk_id="disk0", blocks_total=3, blocks_checked=3, done=True)
    w.target.verify_answers[REPLICA] = [common_pb2.VerifyProgress(disk_id="disk0", blocks_total=3), done]
    assert (await verify(service, vm="vm1", sample_percent=30))[-1] == done
    assert (await verify(service, vm="VM One"))[-1] == done
    assert (await verify(service))[-1] == done  # the job has one VM
    await verify(service, restore_point="rp1")
    await verify(service, restore_point="jobs/job1/restorePoints/rp1", vm="VM One")
    asked = [(r.replica_path, r.restore_point_id, r.sample_percent) for r in w.target.verified]
    assert asked == [(REPLICA, "rp2", 30), (REPLICA, "rp2", 0), (REPLICA, "rp2", 0), *[(REPLICA, "rp1", 0)] * 2]
    assert w.target.reads_closed == 5


async def test_export_relays_the_points_disk(world: tuple[World, ReplicaReadsApi]) -> None:
    w, service = world
    got = await export(service, restore_point="rp1")
    assert [(c.offset, len(c.data), c.done) for c in got] == [(MiB, MiB, False), (0, 0, True)]
    assert got[0].data == DATA[MiB : 2 * MiB]
    await export(service, restore_point="jobs/job1/restorePoints/rp1", job="")
    assert [(r.replica_path, r.restore_point_id, r.disk_id) for r in w.target.read_disks] == [
        (REPLICA, "rp1", "disk0")
    ] * 2


async def test_another_jobs_point_and_a_point_of_another_vm_are_refused(world: tuple[World, ReplicaReadsApi]) -> None:
    w, service = world
    async with w.journal.write() as db:
        other = Job(name="job2", host_id=(await db.get(Job, w.sc.job.job_id)).host_id, target_id=w.sc.target.target_id)  # type: ignore[union-attr]
        other.replica_root = "jobs/job2"
        other.vms = [JobVm(vm_ref="vm9")]
        db.add(other)
        await db.flush()
        other_id = other.id
    await add_point(w, "rp-other", vm_id="vm9", job_id=other_id)
    await add_point(w, "rp-vm2", vm_id="vm2")
    cases = [
        (export(service, restore_point="rp-other"), grpc.StatusCode.NOT_FOUND),
        (verify(service, restore_point="rp-other"), grpc.StatusCode.NOT_FOUND),
        (export(service, restore_point="jobs/job2/restorePoints/rp-other"), grpc.StatusCode.INVALID_ARGUMENT),
        (export(service, restore_point="rp-vm2"), grpc.StatusCode.INVALID_ARGUMENT),  # vm1 named
        (export(service, restore_point="nope"), grpc.StatusCode.NOT_FOUND),
        (verify(service, vm="vm7"), grpc.StatusCode.NOT_FOUND),
    ]
    for call, code in cases:
        assert (await refused(call)).code == code
    assert not w.target.read_disks and not w.target.verified


@pytest.mark.parametrize(
    ("call", "field"),
    [
        ({"restore_point": "../../etc/passwd"}, "restore_point"),
        ({"restore_point": "jobs/job1/restorePoints/../x"}, "restore_point"),
        ({"restore_point": "jobs/job1/points/rp1"}, "restore_point"),
        ({"restore_point": "rp1", "disk": "../disk0"}, "disk"),
        ({"restore_point": "rp1", "disk": ""}, "disk"),
        ({"restore_point": ""}, "restore_point"),
        ({"restore_point": "rp1", "job": "job1"}, "job"),
        ({"restore_point": "rp1", "job": "jobs/../job1"}, "job"),
        ({"restore_point": "rp1", "vm": "x" * 300}, "vm"),
        ({"restore_point": "rp1", "vm": "vm\x00"}, "vm"),
    ],
)
async def test_a_bad_export_request_is_invalid_argument_naming_the_field(
    world: tuple[World, ReplicaReadsApi], call: dict[str, str], field: str
) -> None:
    w, service = world
    e = await refused(export(service, **call))
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT and e.details.startswith(f"{field}:"), e.details
    assert not w.target.read_disks


@pytest.mark.parametrize("percent", [101, 1000, 2**32 - 1])
async def test_a_huge_sample_percent_is_invalid_argument(world: tuple[World, ReplicaReadsApi], percent: int) -> None:
    w, service = world
    e = await refused(verify(service, sample_percent=percent))
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT and e.details.startswith("sample_percent:")
    assert not w.target.verified


async def test_a_job_of_several_vms_needs_the_vm_named(tmp_path: Path) -> None:
    w = await make_world(tmp_path, vms={"vm1": ("disk0",), "vm2": ("disk0",)})
    service = ReplicaReadsApi(
        journal=w.journal,
        reads=async_sessionmaker(w.db, expire_on_commit=False),
        engine=Engine(w.parts),
        secrets=SecretBox([Fernet.generate_key()]),
        live=w.parts.live,
        session_logs=tmp_path,
    )
    try:
        async with w.journal.write() as db:
            await db.execute(update(Session).values(state=SessionState.SUCCEEDED))
        e = await refused(verify(service))
        assert e.code == grpc.StatusCode.INVALID_ARGUMENT and "has 2 VMs" in e.details
    finally:
        await w.close()


async def test_nothing_is_read_while_a_session_of_the_job_runs(world: tuple[World, ReplicaReadsApi]) -> None:
    w, service = world
    async with w.journal.write() as db:
        db.add(Session(job_id=w.sc.job.job_id, state=SessionState.RUNNING))
    for call in (verify(service), export(service, restore_point="rp1")):
        e = await refused(call)
        assert e.code == grpc.StatusCode.FAILED_PRECONDITION and "is running" in e.details
    assert not w.target.verified and not w.target.read_disks


async def test_the_targets_errors_are_relayed_with_their_codes_and_its_name(
    world: tuple[World, ReplicaReadsApi],
) -> None:
    w, service = world
    first = common_pb2.VerifyProgress(disk_id="disk0", blocks_total=3, blocks_checked=1)
    w.target.verify_answers[REPLICA] = [first, rpc_error(grpc.StatusCode.UNAVAILABLE, "connection reset")]
    got: list[common_pb2.VerifyProgress] = []
    with pytest.raises(Aborted) as e:
        async for m in service.VerifyJobReplica(api.VerifyJobReplicaRequest(job="jobs/job1"), FakeContext()):
            got.append(m)
    assert got == [first]
    assert e.value.code == grpc.StatusCode.UNAVAILABLE and "target target" in e.value.details
    assert "connection reset" in e.value.details

    e2 = await refused(export(service, restore_point="rp2"))  # the fake has no data for rp2's disk
    assert e2.code == grpc.StatusCode.NOT_FOUND and "no disk disk0" in e2.details
    w.target.up = False
    assert (await refused(verify(service))).code == grpc.StatusCode.UNAVAILABLE


async def test_a_caller_gone_mid_stream_closes_the_targets_stream(world: tuple[World, ReplicaReadsApi]) -> None:
    w, service = world
    w.target.verify_answers[REPLICA] = [common_pb2.VerifyProgress(disk_id="disk0")] * 3
    call = aiter(service.VerifyJobReplica(api.VerifyJobReplicaRequest(job="jobs/job1"), FakeContext()))
    await anext(call)
    await call.aclose()  # type: ignore[attr-defined]
    assert w.target.reads_closed == 1


async def test_one_caller_holds_at_most_two_replica_reads_at_once(world: tuple[World, ReplicaReadsApi]) -> None:
    """A third verification or export from the same operator, while two are open, is refused at once; when
    one ends, its slot is the caller's again."""
    w, service = world
    first = common_pb2.VerifyProgress(disk_id="disk0", blocks_total=3)
    w.target.verify_answers[REPLICA] = [first, common_pb2.VerifyProgress(disk_id="disk0", blocks_total=3, done=True)]
    request = api.VerifyJobReplicaRequest(job="jobs/job1")
    open_calls = [service.VerifyJobReplica(request, FakeContext()) for _ in range(2)]
    for call in open_calls:
        assert await anext(call) == first  # suspended mid-stream: each holds its slot
    third = service.VerifyJobReplica(request, FakeContext())
    e = await refused(anext(third))
    assert e.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "replica reads" in e.details
    await open_calls[0].aclose()
    assert (await verify(service))[-1].done  # the slot given back
    await open_calls[1].aclose()
