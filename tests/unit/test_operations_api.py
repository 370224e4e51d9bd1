"""The replica operations' API in one process: StartReplicaOperation, GetReplicaVm, ListReplicaVms, a session's
operation VMs, the roles, the job's failover settings, and bad input at each field."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.fernet import Fernet
from sqlalchemy.ext.asyncio import async_sessionmaker

from controller.api.operations import OperationsApi
from controller.api.resources import jobs as jobs_res
from controller.api.service import ROLES
from controller.api.sessions import SessionsApi
from controller.db.models import Host, Job
from controller.db.secrets import SecretBox
from controller.engine.sessions import Engine
from tests.support.operations import OpsWorld, make_ops_world, settle
from vmrepl.errors import InvalidArgument, NotFound
from vmrepl.v1 import controller_pb2 as api


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code, self.message = code, message


class Context:
    def auth_context(self) -> dict[str, list[bytes]]:
        return {}

    def peer(self) -> str:
        return "ipv4:127.0.0.1:5000"

    async def abort(self, code: grpc.StatusCode, message: str, trailing_metadata: Any = ()) -> None:
        raise Aborted(code, message)


class Api(OperationsApi, SessionsApi):
    pass


@pytest.fixture
async def ow(tmp_path: Path) -> AsyncIterator[OpsWorld]:
    world = await make_ops_world(tmp_path)
    await world.add_point(age_seconds=20)
    await world.add_point(age_seconds=10)
    yield world
    await world.w.close()


def _api(ow: OpsWorld, tmp_path: Path) -> Api:
    engine = Engine(ow.w.parts)
    engine.operations = ow.ops
    return Api(
        journal=ow.w.journal,
        reads=async_sessionmaker(ow.w.db, expire_on_commit=False),
        engine=engine,
        secrets=SecretBox([Fernet.generate_key()]),
        live=ow.w.parts.live,
        session_logs=tmp_path,
    )


def _start(op: api.ReplicaOperation.ValueType, *vms: str, **fields: Any) -> api.StartReplicaOperationRequest:
    return api.StartReplicaOperationRequest(
        job="jobs/job1", operation=op, groups=[api.VmGroup(vms=list(vms))], **fields
    )


def test_operations_need_the_operator_role_and_a_reader_can_watch() -> None:
    assert ROLES["StartReplicaOperation"] == ("operator",)
    assert ROLES["GetReplicaVm"] == ROLES["ListReplicaVms"] == ROLES["WatchSession"] == ("operator", "reader")


async def test_a_failover_through_the_api_is_a_session_with_its_vm_steps(ow: OpsWorld, tmp_path: Path) -> None:
    a = _api(ow, tmp_path)
    started = await a.StartReplicaOperation(_start(api.REPLICA_OPERATION_FAILOVER, "vm1"), Context())
    assert started.kind == api.SESSION_KIND_OPERATION and started.operation == api.REPLICA_OPERATION_FAILOVER
    await settle(ow.ops, started.name.removeprefix("sessions/"))
    s = await a.GetSession(api.GetSessionRequest(name=started.name), Context())
    assert s.state == api.SESSION_STATE_SUCCEEDED
    (vm,) = s.operation_vms
    assert (vm.vm_id, vm.state, vm.step_name, vm.group) == ("vm1", api.OPERATION_STEP_DONE, "record", 0)
    assert vm.restore_point == f"jobs/job1/restorePoints/{ow.points[-1]}"
    rv = await a.GetReplicaVm(api.GetReplicaVmRequest(job="job1", vm="vm1"), Context())
    assert rv.state == api.REPLICA_VM_STATE_FAILED_OVER and rv.host == "hosts/failover"
    assert rv.running_vm_name == "vm1_replica" and rv.session == started.name and rv.folder
    listed = await a.ListReplicaVms(api.ListReplicaVmsRequest(parent="jobs/job1"), Context())
    assert [v.vm_id for v in listed.vms] == ["vm1"] and listed.vms[0].state == api.REPLICA_VM_STATE_FAILED_OVER


async def test_a_test_failover_shows_in_the_vm_and_replication_state_stays(ow: OpsWorld, tmp_path: Path) -> None:
    a = _api(ow, tmp_path)
    started = await a.StartReplicaOperation(
        _start(api.REPLICA_OPERATION_TEST_FAILOVER, "vm1", time_limit_seconds=120), Context()
    )
    await settle(ow.ops, started.name.removeprefix("sessions/"))
    rv = await a.GetReplicaVm(api.GetReplicaVmRequest(job="job1"), Context())  # the job's only VM
    assert rv.state == api.REPLICA_VM_STATE_REPLICATING
    (test,) = rv.tests
    assert test.session == started.name and test.deadline.seconds - test.start_time.seconds == 120


@pytest.mark.parametrize(
    ("request_", "code", "words"),
    [
        (_start(api.REPLICA_OPERATION_UNSPECIFIED, "vm1"), grpc.StatusCode.INVALID_ARGUMENT, "operation: is required"),
        (
            api.StartReplicaOperationRequest(job="job1", operation=api.REPLICA_OPERATION_FAILOVER),
            grpc.StatusCode.INVALID_ARGUMENT,
            "groups",
        ),
        (_start(api.REPLICA_OPERATION_FAILOVER, ""), grpc.StatusCode.INVALID_ARGUMENT, "groups[0].vms[0]"),
        (_start(api.REPLICA_OPERATION_FAILOVER, "vm\x00"), grpc.StatusCode.INVALID_ARGUMENT, "control character"),
        (_start(api.REPLICA_OPERATION_FAILOVER, "vm1", point="p\n"), grpc.StatusCode.INVALID_ARGUMENT, "point"),
        (
            _start(api.REPLICA_OPERATION_TEST_FAILOVER, "vm1", time_limit_seconds=10**8),
            grpc.StatusCode.INVALID_ARGUMENT,
            "time_limit_seconds",
        ),
        (
            _start(api.REPLICA_OPERATION_UNDO_FAILOVER, "vm1"),
            grpc.StatusCode.FAILED_PRECONDITION,
            "is not failed over: no undo failover",
        ),
        (_start(api.REPLICA_OPERATION_FAILOVER, "ghost"), grpc.StatusCode.NOT_FOUND, "ghost"),
        (_start(api.REPLICA_OPERATION_COMMIT_FAILBACK, "vm1"), grpc.StatusCode.FAILED_PRECONDITION, "commit failback"),
        (
            api.StartReplicaOperationRequest(
                job="nope", operation=api.REPLICA_OPERATION_FAILOVER, groups=[api.VmGroup(vms=["vm1"])]
            ),
            grpc.StatusCode.NOT_FOUND,
            "jobs/nope",
        ),
    ],
)
async def test_bad_requests_and_refusals_get_their_codes(
    ow: OpsWorld, tmp_path: Path, request_: api.StartReplicaOperationRequest, code: grpc.StatusCode, words: str
) -> None:
    with pytest.raises(Aborted) as e:
        await _api(ow, tmp_path).StartReplicaOperation(request_, Context())
    assert e.value.code == code and words in e.value.message


async def test_the_job_keeps_its_failover_settings_and_checks_them(ow: OpsWorld) -> None:
    async with ow.w.journal.write() as db:
        job = await db.get(Job, ow.job_id)
        assert job is not None
        msg = api.Job(
            failover_host="hosts/failover",
            failback_target="targets/target",
            network_mapping=[api.NetworkMapping(source_switch="LAN", target_switch="DR")],
        )
        await jobs_res.apply_job(db, msg, job, ["failover_host", "failback_target", "network_mapping"], secrets=None)  # type: ignore[arg-type]
        shown = await jobs_res.job_msg(db, job)
        assert (shown.failover_host, shown.failback_target) == ("hosts/failover", "targets/target")
        assert [(m.source_switch, m.target_switch) for m in shown.network_mapping] == [("LAN", "DR")]
        with pytest.raises(NotFound, match="hosts/elsewhere"):
            await jobs_res.apply_job(db, api.Job(failover_host="hosts/elsewhere"), job, ["failover_host"], secrets=None)  # type: ignore[arg-type]
        db.add(Host(name="vmware", provider="vsphere", address="x"))
        await db.flush()
        with pytest.raises(InvalidArgument, match="cannot register VMs"):
            await jobs_res.apply_job(db, api.Job(failover_host="hosts/vmware"), job, ["failover_host"], secrets=None)  # type: ignore[arg-type]
        twice = api.Job(network_mapping=[api.NetworkMapping(source_switch="A", target_switch="B")] * 2)
        with pytest.raises(InvalidArgument, match=r"network_mapping\[1\].source_switch: 'A' is mapped twice"):
            await jobs_res.apply_job(db, twice, job, ["network_mapping"], secrets=None)  # type: ignore[arg-type]
        cased = api.Job(
            network_mapping=[
                api.NetworkMapping(source_switch="LAN", target_switch="B"),
                api.NetworkMapping(source_switch="lan", target_switch="C"),
            ]
        )
        with pytest.raises(InvalidArgument, match=r"network_mapping\[1\].source_switch: 'lan' is mapped twice"):
            await jobs_res.apply_job(db, cased, job, ["network_mapping"], secrets=None)  # type: ignore[arg-type]
        empty = api.Job(network_mapping=[api.NetworkMapping(source_switch="A", target_switch="")])
        with pytest.raises(InvalidArgument, match="target_switch"):
            await jobs_res.apply_job(db, empty, job, ["network_mapping"], secrets=None)  # type: ignore[arg-type]
        await jobs_res.apply_job(db, api.Job(), job, ["failover_host"], secrets=None)  # type: ignore[arg-type]
        assert job.failover_host_id is None  # unset again


async def test_a_job_whose_vm_runs_from_its_replica_is_not_deleted(ow: OpsWorld, tmp_path: Path) -> None:
    from controller.api.jobs import JobsApi

    class WithJobs(JobsApi, Api):
        pass

    a = WithJobs(
        journal=ow.w.journal,
        reads=async_sessionmaker(ow.w.db, expire_on_commit=False),
        engine=_api(ow, tmp_path).engine,
        secrets=SecretBox([Fernet.generate_key()]),
        live=ow.w.parts.live,
        session_logs=tmp_path,
    )
    started = await a.StartReplicaOperation(_start(api.REPLICA_OPERATION_TEST_FAILOVER, "vm1"), Context())
    await settle(ow.ops, started.name.removeprefix("sessions/"))
    with pytest.raises(Aborted) as e:
        await a.DeleteJob(api.DeleteJobRequest(name="jobs/job1"), Context())
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "a test failover of VM vm1" in e.value.message
    stop = await a.StartReplicaOperation(_start(api.REPLICA_OPERATION_STOP_TEST, "vm1"), Context())
    await settle(ow.ops, stop.name.removeprefix("sessions/"))
    failover = await a.StartReplicaOperation(_start(api.REPLICA_OPERATION_FAILOVER, "vm1"), Context())
    await settle(ow.ops, failover.name.removeprefix("sessions/"))
    with pytest.raises(Aborted) as e:
        await a.DeleteJob(api.DeleteJobRequest(name="jobs/job1"), Context())
    assert "VM vm1 (failed over; undo or commit it first)" in e.value.message


async def test_a_failover_host_or_failback_target_a_job_names_is_not_deleted(ow: OpsWorld, tmp_path: Path) -> None:
    from controller.api.inventory import InventoryApi
    from controller.db.models import Target

    class WithInventory(InventoryApi, Api):
        pass

    async with ow.w.journal.write() as db:
        db.add(Target(name="near", address="near:1"))
        await db.flush()
        job = await db.get(Job, ow.job_id)
        assert job is not None
        await jobs_res.apply_job(db, api.Job(failback_target="targets/near"), job, ["failback_target"], secrets=None)  # type: ignore[arg-type]
    a = WithInventory(
        journal=ow.w.journal,
        reads=async_sessionmaker(ow.w.db, expire_on_commit=False),
        engine=_api(ow, tmp_path).engine,
        secrets=SecretBox([Fernet.generate_key()]),
        live=ow.w.parts.live,
        session_logs=tmp_path,
    )
    with pytest.raises(Aborted) as e:
        await a.DeleteHost(api.DeleteHostRequest(name="hosts/failover"), Context())
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "jobs/job1" in e.value.message
    with pytest.raises(Aborted) as e:
        await a.DeleteTarget(api.DeleteTargetRequest(name="targets/near"), Context())
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "jobs/job1" in e.value.message


async def test_a_huge_vm_reference_is_refused_without_being_echoed(ow: OpsWorld, tmp_path: Path) -> None:
    # A reader may ask GetReplicaVm in a loop: a 1 MiB `vm` came back (and went to the log) in a NOT_FOUND.
    with pytest.raises(Aborted) as e:
        await _api(ow, tmp_path).GetReplicaVm(api.GetReplicaVmRequest(job="job1", vm="v" * (1 << 20)), Context())
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and len(e.value.message) < 300
