"""A failback to a new location with real processes: a controller, a proxy and a target on loopback with mTLS,
the source file host, the failover file host (the target's vm_root) and a third file host, the new location,
whose folder is among the target's failback_roots. Fail over, write, fail back to the new host (the new VM's
disks equal the failed-over VM's; the original is never touched), undo it (the new VM and its folder gone,
the failed-over VM running again), fail back again and commit: the job replicates the new VM from its host,
a first session in full, then incrementally."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import field_mask_pb2

from controller import lab
from tests.integration.controller_env import ControllerEnv, make_env
from vmrepl.domain import PowerState
from vmrepl.extent import MiB
from vmrepl.providers.filehost import FileHostProvider
from vmrepl.v1 import controller_pb2 as api

DISKS = ("disk0", "disk1")
SIZE = 8 * MiB


@pytest.fixture
def env(tmp_path: Path, lab_certs: lab.LabCerts) -> Iterator[ControllerEnv]:
    vm_root, new_root = tmp_path / "vm_root", tmp_path / "newhost"
    vm_root.mkdir()
    new_root.mkdir()
    host = tmp_path / "host"
    e = make_env(
        tmp_path,
        lab_certs,
        disk_mib=8,
        target_settings={"vm_root": str(vm_root), "failback_roots": [str(host), str(new_root)]},
        proxy_settings={"source_roots": [str(host), str(vm_root), str(new_root)]},
    )
    try:
        e.configure(vms=("vm1",))
        stub = e.client()
        for name, folder in (("dr", vm_root), ("newhost", new_root)):
            stub.CreateHost(api.CreateHostRequest(host_id=name, host=api.Host(provider="file", address=str(folder))))
        mask = field_mask_pb2.FieldMask(paths=["failover_host"])
        stub.UpdateJob(api.UpdateJobRequest(job=api.Job(name="jobs/job1", failover_host="hosts/dr"), update_mask=mask))
        yield e
    finally:
        e.stop()


def _disks(provider: FileHostProvider, vm: str) -> dict[str, bytes]:
    v = provider.vm(vm)
    return {d: v.read_current(d, 0, SIZE) for d in DISKS}


def _write(provider: FileHostProvider, vm: str, seed: int, offsets: tuple[int, ...]) -> None:
    v = provider.vm(vm)
    for off in offsets:
        v.write("disk0", off, bytes([seed]) * 65536)
        v.write("disk1", off + MiB, bytes([seed + 1]) * 65536)


def _operate(env: ControllerEnv, op: api.ReplicaOperation.ValueType, *, failback_host: str = "") -> api.Session:
    request = api.StartReplicaOperationRequest(
        job="jobs/job1", operation=op, groups=[api.VmGroup(vms=["vm1"])], failback_host=failback_host
    )
    s = env.wait_session(env.client().StartReplicaOperation(request).name)
    assert s.state == api.SESSION_STATE_SUCCEEDED, (s.error, list(s.operation_vms))
    return s


def _where(env: ControllerEnv) -> api.ReplicaVm:
    vm: api.ReplicaVm = env.client().GetReplicaVm(api.GetReplicaVmRequest(job="jobs/job1", vm="vm1"))
    return vm


def _sha(disks: dict[str, bytes]) -> str:
    return hashlib.sha256(b"".join(disks[d] for d in DISKS)).hexdigest()


def _nonzero_blocks(disks: dict[str, bytes]) -> int:
    return sum(any(data[at : at + MiB]) for data in disks.values() for at in range(0, len(data), MiB))


def _fail_back_to_new(env: ControllerEnv, new: FileHostProvider, expected: dict[str, bytes], *, cli: bool) -> str:
    if cli:
        out = env.cli("replica", "failback", "job1", "--vm", "vm1", "--to", "newhost")
        assert "succeeded" in out.stdout, out.stdout + out.stderr
    else:  # every non-zero block differs from the new, empty image: exactly those travel
        (row,) = _operate(env, api.REPLICA_OPERATION_FAILBACK, failback_host="hosts/newhost").operation_vms
        assert row.blocks_differing == _nonzero_blocks(expected) > 0, row
    assert _where(env).state == api.REPLICA_VM_STATE_FAILED_BACK
    (vm,) = asyncio.run(new.list_vms())
    assert vm.power is PowerState.RUNNING and vm.name == "vm1"
    assert _disks(new, vm.vm_id) == expected
    return vm.vm_id


def test_failback_to_a_new_file_host_undo_then_commit_and_replicate_it(env: ControllerEnv, tmp_path: Path) -> None:
    source = FileHostProvider(env.host)
    dr, new = FileHostProvider(tmp_path / "vm_root"), FileHostProvider(tmp_path / "newhost")
    for i in range(2):
        _write(source, "vm1", 10 + i, (i * 2 * MiB,))
        assert env.run_job().state == api.SESSION_STATE_SUCCEEDED
    original = _sha(_disks(source, "vm1"))

    _operate(env, api.REPLICA_OPERATION_FAILOVER)
    running = _where(env).running_vm_id
    _write(dr, running, 77, (3 * MiB, 6 * MiB))
    failed_over = _disks(dr, running)

    # Fail back to the new host: a new VM there, its disks the failed-over VM's; the original untouched.
    new_vm = _fail_back_to_new(env, new, failed_over, cli=True)
    assert _sha(_disks(source, "vm1")) == original
    assert source.vm("vm1").info().power is PowerState.RUNNING  # never asked to stop
    assert dr.vm(running).info().power is PowerState.OFF

    # Undo: the new VM and its folder are gone; the failed-over VM runs again.
    _operate(env, api.REPLICA_OPERATION_UNDO_FAILBACK)
    assert _where(env).state == api.REPLICA_VM_STATE_FAILED_OVER
    assert not [p for p in (tmp_path / "newhost").iterdir() if not p.name.startswith(".")]
    assert dr.vm(running).info().power is PowerState.RUNNING
    _write(dr, running, 55, (5 * MiB,))
    failed_over = _disks(dr, running)

    # Again, then commit: the job's VM is the new VM, on the new host.
    s_vm = _fail_back_to_new(env, new, failed_over, cli=False)
    assert s_vm != new_vm
    _operate(env, api.REPLICA_OPERATION_COMMIT_FAILBACK)
    assert _where(env).state == api.REPLICA_VM_STATE_PERMANENT  # the original left the job
    job = env.client().GetJob(api.GetJobRequest(name="jobs/job1"))
    assert job.host == "hosts/newhost" and [v.vm for v in job.vms] == [s_vm], job
    assert not [p for p in (tmp_path / "vm_root").iterdir() if not p.name.startswith(".")]
    assert not list((env.work / "datastore").glob(".failback/**/data.raw"))  # the failback folder deleted

    # Replicated from its new host: a full first session into its own replica, then an incremental.
    first = env.run_job()
    assert first.state == api.SESSION_STATE_SUCCEEDED, first.error
    replica = env.work / "datastore" / "replicas" / "job1" / s_vm / "disks"
    assert {d: (replica / d / "data.raw").read_bytes()[:SIZE] for d in DISKS} == _disks(new, s_vm)
    where = _where(env)  # the name is the new VM's now
    assert (where.vm_id, where.state) == (s_vm, api.REPLICA_VM_STATE_REPLICATING), where
    _write(new, s_vm, 33, (1 * MiB,))
    second = env.run_job()
    assert second.state == api.SESSION_STATE_SUCCEEDED, second.error
    assert {d.change_mode for v in second.vms for d in v.disks} == {"ranges"}, second.vms
    assert {d: (replica / d / "data.raw").read_bytes()[:SIZE] for d in DISKS} == _disks(new, s_vm)


@pytest.mark.timeout(900)  # a controller restarted four times for each change tried
def test_a_controller_killed_at_steps_of_a_failback_to_a_new_location_and_its_undo(
    env: ControllerEnv, tmp_path: Path
) -> None:
    """Real processes, killed after every third change (each costs four controller starts, ~8 s: all 21 would
    take three minutes of the suite); tests/unit/test_operations_newloc.py kills the controller after every
    single change of the same steps, in process."""
    dr, new = FileHostProvider(tmp_path / "vm_root"), FileHostProvider(tmp_path / "newhost")
    _write(FileHostProvider(env.host), "vm1", 10, (0,))
    assert env.run_job().state == api.SESSION_STATE_SUCCEEDED
    _operate(env, api.REPLICA_OPERATION_FAILOVER)
    running = _where(env).running_vm_id
    _write(dr, running, 77, (3 * MiB,))
    failed_over = _disks(dr, running)
    n = 1
    while env.operate_crashing_at(n, api.REPLICA_OPERATION_FAILBACK, failback_host="hosts/newhost"):
        assert _where(env).state == api.REPLICA_VM_STATE_FAILED_BACK, n
        (vm,) = asyncio.run(new.list_vms())
        assert vm.power is PowerState.RUNNING and _disks(new, vm.vm_id) == failed_over, n
        env.operate_crashing_at(
            n, api.REPLICA_OPERATION_UNDO_FAILBACK
        )  # killed at its nth change too, while it has one
        assert _where(env).state == api.REPLICA_VM_STATE_FAILED_OVER, n
        assert not [p for p in (tmp_path / "newhost").iterdir() if not p.name.startswith(".")], n
        assert dr.vm(running).info().power is PowerState.RUNNING and _disks(dr, running) == failed_over
        print(f"killed after change {n}: failback and undo finished", flush=True)
        n += 3
    assert n > 8  # the hook fired at the failback's changes tried
    _operate(env, api.REPLICA_OPERATION_UNDO_FAILBACK)  # the last failback ran to its end unharmed
    assert not list((env.work / "datastore").glob(".failback/**/data.raw"))  # no attempt left a folder behind
    assert not [p for p in (tmp_path / "newhost").iterdir() if not p.name.startswith(".")]
