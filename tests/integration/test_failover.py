"""Failover, undo, failback and their commit with real processes: a controller, a proxy and a target on
loopback with mTLS, a file host with the source VM and a second file host (the failover host) whose folder is
the target's vm_root. The issue's cycle: replicate three times with writes between, fail over to the oldest
kept point and compare its bytes with a copy of the source taken then; write to the failed-over VM; undo and
find the replica unchanged; fail over again, write, fail back and find the original equal to the failed-over
VM with only the changed blocks sent; commit and replicate again."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2

from controller import lab
from tests.integration.controller_env import ControllerEnv, make_env
from vmrepl.domain import DiskFormat, PowerState
from vmrepl.extent import MiB
from vmrepl.providers.filehost import FileHostProvider, load_manifest
from vmrepl.v1 import controller_pb2 as api
from vmrepl.v1 import target_pb2

DISKS = ("disk0", "disk1")
SIZE = 8 * MiB


@pytest.fixture
def env(tmp_path: Path, lab_certs: lab.LabCerts) -> Iterator[ControllerEnv]:
    vm_root = tmp_path / "vm_root"
    vm_root.mkdir()
    host = tmp_path / "host"
    e = make_env(
        tmp_path,
        lab_certs,
        disk_mib=8,
        target_settings={"vm_root": str(vm_root), "failback_roots": [str(host)]},
        proxy_settings={"source_roots": [str(host), str(vm_root)]},
    )
    try:
        e.configure(vms=("vm1",))
        stub = e.client()
        stub.CreateHost(api.CreateHostRequest(host_id="dr", host=api.Host(provider="file", address=str(vm_root))))
        mask = field_mask_pb2.FieldMask(paths=["failover_host"])
        stub.UpdateJob(api.UpdateJobRequest(job=api.Job(name="jobs/job1", failover_host="hosts/dr"), update_mask=mask))
        yield e
    finally:
        e.stop()


def _disks(env: ControllerEnv, provider: FileHostProvider, vm: str) -> dict[str, bytes]:
    v = provider.vm(vm)
    return {d: v.read_current(d, 0, SIZE) for d in DISKS}


def _write(provider: FileHostProvider, vm: str, seed: int, offsets: tuple[int, ...]) -> None:
    v = provider.vm(vm)
    for off in offsets:
        v.write("disk0", off, bytes([seed]) * 65536)
        v.write("disk1", off + MiB, bytes([seed + 1]) * 65536)


def _operate(
    env: ControllerEnv, op: api.ReplicaOperation.ValueType, *, point: str = "", time_limit_seconds: int = 0
) -> api.Session:
    request = api.StartReplicaOperationRequest(
        job="jobs/job1",
        operation=op,
        groups=[api.VmGroup(vms=["vm1"])],
        point=point,
        time_limit_seconds=time_limit_seconds,
    )
    started = env.client().StartReplicaOperation(request)
    s = env.wait_session(started.name)
    assert s.state == api.SESSION_STATE_SUCCEEDED, (s.error, list(s.operation_vms))
    return s


def _replica_hash(env: ControllerEnv) -> str:
    h = hashlib.sha256()
    for d in DISKS:
        h.update(env.replica("vm1", d).read_bytes())
    return h.hexdigest()


def _where(env: ControllerEnv) -> api.ReplicaVm:
    vm: api.ReplicaVm = env.client().GetReplicaVm(api.GetReplicaVmRequest(job="jobs/job1", vm="vm1"))
    return vm


def test_failover_undo_failback_and_commit_with_real_agents(env: ControllerEnv, tmp_path: Path) -> None:
    source, dr = FileHostProvider(env.host), FileHostProvider(tmp_path / "vm_root")
    copies = []
    for i in range(3):
        _write(source, "vm1", 10 + i, (i * 2 * MiB,))
        assert env.run_job().state == api.SESSION_STATE_SUCCEEDED
        copies.append(_disks(env, source, "vm1"))
    oldest = sorted(env.points(), key=lambda p: p.create_time.ToDatetime())[0]

    # Fail over to the oldest point: the VM's disks are that point's bytes.
    s = _operate(env, api.REPLICA_OPERATION_FAILOVER, point=oldest.name)
    where = _where(env)
    assert where.state == api.REPLICA_VM_STATE_FAILED_OVER and where.restore_point == oldest.name
    assert _disks(env, dr, where.running_vm_id) == copies[0]
    assert dr.vm(where.running_vm_id).info().power is PowerState.RUNNING
    before = _replica_hash(env)
    _write(dr, where.running_vm_id, 99, (0, 5 * MiB))
    with pytest.raises(grpc.RpcError) as refused:  # replication of the VM is paused, and a second failover refused
        _operate(env, api.REPLICA_OPERATION_FAILOVER)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert env.run_job().state == api.SESSION_STATE_SUCCEEDED and _replica_hash(env) == before

    shown = env.cli("replica", "show", "job1", "--vm", "vm1").stdout
    assert "failed over" in shown and "hosts/dr" in shown and where.running_vm_name in shown

    # Undo (through the CLI, followed to its end): the replica is as it was; the failed-over VM's folder is gone.
    undo = env.cli("replica", "undo-failover", "job1", "--vm", "vm1")
    assert "succeeded" in undo.stdout and "vm1" in undo.stdout, undo.stdout + undo.stderr
    assert _replica_hash(env) == before and _where(env).state == api.REPLICA_VM_STATE_REPLICATING
    assert not [p for p in (tmp_path / "vm_root").iterdir() if not p.name.startswith(".")]

    # Fail over to the newest, write, fail back onto the original (off).
    _operate(env, api.REPLICA_OPERATION_FAILOVER)
    running = _where(env).running_vm_id
    assert _disks(env, dr, running) == copies[2]
    _write(dr, running, 77, (3 * MiB,))
    asyncio.run(source.stop_vm(str(source.vm("vm1").manifest.id)))  # the original is off for the failback
    s = _operate(env, api.REPLICA_OPERATION_FAILBACK)
    (vm,) = s.operation_vms
    assert vm.blocks_differing == 2, vm  # one 64 KiB write per disk, each in one 1 MiB block
    assert _disks(env, source, "vm1") == _disks(env, dr, running)
    assert source.vm("vm1").info().power is PowerState.RUNNING
    assert _where(env).state == api.REPLICA_VM_STATE_FAILED_BACK
    # The failback folder went, and with it the job's `.failback/<job id>/` it was the last in.
    assert not [p for p in (env.work / "datastore" / ".failback").iterdir()]

    # Commit: replication resumes from the original, comparing digests first.
    _operate(env, api.REPLICA_OPERATION_COMMIT_FAILBACK)
    assert _where(env).state == api.REPLICA_VM_STATE_REPLICATING
    session = env.run_job()
    assert session.state == api.SESSION_STATE_SUCCEEDED
    assert {d.change_mode for v in session.vms for d in v.disks} == {"compare"}
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not (tmp_path / "vm_root").exists():
        time.sleep(0.1)
    assert _disks(env, source, "vm1")["disk0"] == env.replica("vm1", "disk0").read_bytes()[:SIZE]


def test_planned_failover_loses_nothing_and_permanent_failover_leaves_the_job(
    env: ControllerEnv, tmp_path: Path
) -> None:
    source, dr = FileHostProvider(env.host), FileHostProvider(tmp_path / "vm_root")
    assert env.run_job().state == api.SESSION_STATE_SUCCEEDED
    _write(source, "vm1", 42, (MiB, 6 * MiB))  # written after the last session, before the shutdown
    at_shutdown = _disks(env, source, "vm1")
    _operate(env, api.REPLICA_OPERATION_PLANNED_FAILOVER)
    assert source.vm("vm1").info().power is PowerState.OFF
    where = _where(env)
    assert _disks(env, dr, where.running_vm_id) == at_shutdown
    _write(dr, where.running_vm_id, 5, (2 * MiB,))
    written = _disks(env, dr, where.running_vm_id)

    _operate(env, api.REPLICA_OPERATION_PERMANENT_FAILOVER)
    assert _where(env).state == api.REPLICA_VM_STATE_PERMANENT
    assert not env.points() and not env.client().GetJob(api.GetJobRequest(name="jobs/job1")).vms
    assert not env.replica("vm1", "disk0").exists()  # the replica is gone from the target
    vm = dr.vm(where.running_vm_id)
    assert vm.info().power is PowerState.RUNNING and _disks(env, dr, where.running_vm_id) == written
    # The layers merged into the base images, and the VM stands on them: vm.toml names each plain raw image
    # (the replica's data file lived on as it), no layer descriptor is left, and the target keeps no mount.
    assert not env.target_stub().ListMounts(target_pb2.ListMountsRequest()).mounts
    folder = tmp_path / "vm_root" / where.folder
    manifest = load_manifest(folder)
    assert [(d.id, d.path, d.format) for d in manifest.disks] == [(d, f"{d}.base", DiskFormat.RAW) for d in DISKS]
    assert not list(folder.glob("*.layer"))
    assert all((folder / f"{d}.base").stat().st_nlink == 1 for d in DISKS)
    _write(dr, where.running_vm_id, 6, (3 * MiB,))  # the production VM writes its own image now
    assert _disks(env, dr, where.running_vm_id)["disk0"] == (folder / "disk0.base").read_bytes()


def test_a_test_failover_keeps_its_point_while_a_session_writes_the_replica(env: ControllerEnv, tmp_path: Path) -> None:
    source, dr = FileHostProvider(env.host), FileHostProvider(tmp_path / "vm_root")
    assert env.run_job().state == api.SESSION_STATE_SUCCEEDED
    at_point = _disks(env, source, "vm1")
    # Every block changes, at 0.5 MB/s: the session writes for well over the test failover's few seconds, even
    # on a loaded machine (it is unlimited once the test runs).
    _write(source, "vm1", 66, tuple(i * MiB for i in range(7)))
    stub = env.client()
    mask = field_mask_pb2.FieldMask(paths=["bandwidth_limit_mbps"])
    slow = api.Job(name="jobs/job1", bandwidth_limit_mbps=0.5)
    stub.UpdateJob(api.UpdateJobRequest(job=slow, update_mask=mask))
    running = stub.StartJob(api.StartJobRequest(name="jobs/job1"))
    env.wait_until(running.name, lambda s: any(d.committed_offset > 0 for v in s.vms for d in v.disks))
    # Started while the session writes the replica: the test VM runs the point as it was.
    _operate(env, api.REPLICA_OPERATION_TEST_FAILOVER, time_limit_seconds=3600)
    (test,) = _where(env).tests
    assert dr.vm(test.vm_id).info().power is PowerState.RUNNING
    assert env.session(running.name).state == api.SESSION_STATE_RUNNING
    env.unlimit()
    session = env.wait_session(running.name)
    assert session.state == api.SESSION_STATE_SUCCEEDED and _where(env).state == api.REPLICA_VM_STATE_REPLICATING
    assert _disks(env, dr, test.vm_id) == at_point  # the session's overwrites were copied to the test first
    assert env.replica("vm1", "disk0").read_bytes()[:SIZE] == _disks(env, source, "vm1")["disk0"]
    _operate(env, api.REPLICA_OPERATION_STOP_TEST)
    assert not _where(env).tests
    assert not [p for p in (tmp_path / "vm_root").iterdir() if not p.name.startswith(".")]


def test_a_controller_killed_at_every_step_of_a_failover_and_its_undo_finishes_them(
    env: ControllerEnv, tmp_path: Path
) -> None:
    dr_root = tmp_path / "vm_root"
    assert env.run_job().state == api.SESSION_STATE_SUCCEEDED
    before = _replica_hash(env)
    n = 1
    while env.operate_crashing_at(n, api.REPLICA_OPERATION_FAILOVER):
        where = _where(env)
        assert where.state == api.REPLICA_VM_STATE_FAILED_OVER, n
        folders = [p for p in dr_root.iterdir() if not p.name.startswith(".")]
        assert (
            len(folders) == 1 and FileHostProvider(dr_root).vm(where.running_vm_id).info().power is PowerState.RUNNING
        )
        env.operate_crashing_at(
            n, api.REPLICA_OPERATION_UNDO_FAILOVER
        )  # killed at its nth change too, while it has one
        assert _where(env).state == api.REPLICA_VM_STATE_REPLICATING
        assert not [p for p in dr_root.iterdir() if not p.name.startswith(".")]
        assert _replica_hash(env) == before
        n += 1
    assert n > 5  # the hook fired at every one of the failover's changes
