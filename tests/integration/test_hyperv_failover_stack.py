"""The issue's failover cycle for Hyper-V through the whole stack: the controller, a proxy and a target as real
processes, and two Hyper-V hosts, each a stand-in of its own (tests/support/hyperv: its own WS-Man server on
its own port, its own model and drives): `hv01` runs the source VM (disks on its `C:`), `hv02` is the job's
failover host. The target's `vm_root` is the folder hv02 names `D:\\vmrepl\\vms` (its `vm_root_host_path`),
on the datastore's file system, so mounts hard-link the replica's VHDX files there; the proxy maps hv01's
`C:\\` and hv02's `D:\\` (as an off-host proxy mounts each host's share), and the target's failback_roots hold
hv01's storage, which a failback writes in place."""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2

from controller import lab
from tests.integration.controller_env import ControllerEnv
from tests.integration.hyperv_env import PASSWORD
from tests.integration.test_hyperv_failover import provider_for
from tests.support.controller_db import seed_controller_database
from tests.support.hyperv import faults
from tests.support.hyperv.lab import HyperVLab, hyperv_lab
from tests.support.hyperv.state import NicState, SwitchState
from vmrepl.extent import MiB
from vmrepl.v1 import controller_pb2 as api
from vmrepl.v1 import target_pb2

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

SRC = "C:\\Hyper-V\\Virtual Hard Disks"
VM_ROOT_HOST = "D:\\vmrepl\\vms"
SIZES = (8 * MiB, 4 * MiB)
DISK_IDS = ("scsi0-0", "scsi0-1")
REPLICA_NAME = "web01_replica"
CONFIGURED = ("generation", "version", "secure_boot", "secure_boot_template", "tpm", "processors", "dynamic_memory")
MEMORY = ("memory_startup", "memory_minimum", "memory_maximum")


@dataclass
class FailoverStack:
    ctl: ControllerEnv
    src: HyperVLab  # hv01: the source VM
    dr: HyperVLab  # hv02: the failover host
    vm_id: str
    vm_root: Path

    def replica(self, disk_id: str) -> Path:
        return self.ctl.work / "datastore" / "job1" / self.vm_id / "disks" / disk_id / "data.vhdx"

    def replica_hash(self) -> str:
        h = hashlib.sha256()
        for d in DISK_IDS:
            h.update(self.replica(d).read_bytes())
        return h.hexdigest()

    def source_disks(self) -> list[bytes]:
        return [self.src.host.read("web01", i) for i in range(len(SIZES))]

    def vm_disks(self, name: str) -> list[bytes]:
        """What the failed-over (or test) VM's guest reads: through the stand-in's differencing disks."""
        return [self.dr.host.read(name, i) for i in range(len(SIZES))]

    def where(self) -> api.ReplicaVm:
        vm: api.ReplicaVm = self.ctl.client().GetReplicaVm(api.GetReplicaVmRequest(job="jobs/job1", vm="web01"))
        return vm

    def operate(self, op: api.ReplicaOperation.ValueType, *, point: str = "", limit: int = 0) -> api.OperationVm:
        request = api.StartReplicaOperationRequest(
            job="jobs/job1", operation=op, groups=[api.VmGroup(vms=["web01"])], point=point, time_limit_seconds=limit
        )
        started = self.ctl.client().StartReplicaOperation(request)
        s = self.ctl.wait_session(started.name)
        assert s.state == api.SESSION_STATE_SUCCEEDED, (s.error, list(s.operation_vms))
        (vm,) = s.operation_vms
        return vm

    def mount_folders(self) -> list[str]:
        return sorted(p.name for p in self.vm_root.iterdir() if not p.name.startswith("."))

    def configure(self) -> None:
        stub = self.ctl.client()
        stub.CreateTarget(
            api.CreateTargetRequest(target_id="target", target=api.Target(address=self.ctl.target.address))
        )
        stub.CreateProxy(api.CreateProxyRequest(proxy_id="proxy1", proxy=api.Proxy(address=self.ctl.proxy.address)))
        stub.CreateCredential(
            api.CreateCredentialRequest(
                credential_id="hvadmin", credential=api.Credential(username=self.src.username), secret=PASSWORD
            )
        )
        for host_id, hv in (("hv01", self.src), ("hv02", self.dr)):
            winrm = api.WinRmSettings(port=hv.port, auth="basic", ca_bundle=str(hv.ca_bundle))
            host = api.Host(provider="hyperv", address="localhost", credential="credentials/hvadmin", winrm=winrm)
            stub.CreateHost(api.CreateHostRequest(host_id=host_id, host=host))
        spec = api.Job(
            host="hosts/hv01",
            target="targets/target",
            replica_root="job1",
            vms=[api.JobVm(vm="web01")],
            failover_host="hosts/hv02",
            network_mapping=[api.NetworkMapping(source_switch="LAN", target_switch="LAN-DR")],
        )
        stub.CreateJob(api.CreateJobRequest(job_id="job1", job=spec))


def _seed(src: HyperVLab, dr: HyperVLab) -> str:
    nics = [
        NicState(name="Front", switch="LAN", mac="00155D0A0B0C", vlan_id=12),
        NicState(name="Back", switch="DMZ", mac="00155D0A0B0D", dynamic_mac=True),
    ]
    src.host.state.switches += [SwitchState(name="LAN", type="External"), SwitchState(name="DMZ", type="Internal")]
    dr.host.state.switches.append(SwitchState(name="LAN-DR", type="External"))
    vm = src.host.add_vm(
        "web01",
        disks=[(f"{SRC}\\web01-{i}.vhdx", s) for i, s in enumerate(SIZES)],
        nics=nics,
        generation=2,
        processors=3,
        dynamic_memory=True,
        memory_startup=1024**3,
        memory_minimum=256 * MiB,
        memory_maximum=2 * 1024**3,
        secure_boot_template="MicrosoftUEFICertificateAuthority",
    )
    rng = random.Random(7)
    for i, size in enumerate(SIZES):  # incompressible data in every other MiB, the rest zero
        for off in range(0, size, 2 * MiB):
            src.host.write("web01", i, off, rng.randbytes(MiB))
    return vm.id.lower()


@contextmanager
def failover_stack(work: Path, certs: lab.LabCerts) -> Iterator[FailoverStack]:
    with ExitStack() as stack:
        src = stack.enter_context(hyperv_lab(work / "hv01", certs=certs.directory, password=PASSWORD))
        dr = stack.enter_context(hyperv_lab(work / "hv02", certs=certs.directory, password=PASSWORD))
        vm_id = _seed(src, dr)
        vm_root = dr.host.local(VM_ROOT_HOST)
        vm_root.mkdir(parents=True)
        (dr.drives / "D").mkdir(parents=True, exist_ok=True)
        target_cfg = lab.target_config(
            work,
            certs,
            level="debug",
            vm_root=str(vm_root),
            vm_root_host_path=VM_ROOT_HOST,
            failback_roots=[str(src.drives / "C")],
            host_paths=[{"host_prefix": "C:\\", "local": str(src.drives / "C")}],  # hv01's disks, by host path
        )
        target = lab.AgentProcess("target_agent", target_cfg, work / "target.log")
        mapping = [
            {"host_prefix": "C:\\", "local": str(src.drives / "C")},
            {"host_prefix": "D:\\", "local": str(dr.drives / "D")},
        ]
        proxy_cfg = lab.proxy_config(
            work, certs, sources=src.drives, batch_bytes=MiB, window_batches=4, host_paths=mapping, source_roots=[]
        )
        proxy = lab.AgentProcess("proxy_agent", proxy_cfg, work / "proxy.log")
        seed_controller_database(work / "controller")
        controller = lab.AgentProcess(
            "controller", lab.controller_config(work, certs, shutdown_vm_seconds=30), work / "controller.log"
        )
        env = ControllerEnv(work, certs, src.drives, target, proxy, controller)
        stack.callback(env.stop)
        lab.start_all([target, proxy, controller])
        fs = FailoverStack(env, src, dr, vm_id, vm_root)
        fs.configure()
        yield fs
        assert src.server.handler_errors == [] and dr.server.handler_errors == []


@pytest.fixture
def hv(tmp_path: Path, lab_certs: lab.LabCerts) -> Iterator[FailoverStack]:
    with failover_stack(tmp_path, lab_certs) as stack:
        yield stack


def _writes(seed: int, offsets: tuple[int, ...]) -> list[tuple[int, int, bytes]]:
    """(disk, offset, data): 64 KiB per disk per offset, disk 1's moved inside its smaller size."""
    out = []
    for off in offsets:
        out += [(0, off, bytes([seed]) * 65536), (1, off % SIZES[1] + 512 * 1024, bytes([seed + 1]) * 65536)]
    return out


def _write(hv: HyperVLab, vm: str, seed: int, offsets: tuple[int, ...]) -> None:
    for disk, off, data in _writes(seed, offsets):
        hv.host.write(vm, disk, off, data)


def _patched(disks: list[bytes], seed: int, offsets: tuple[int, ...]) -> list[bytes]:
    """`disks` as they read after `_write(..., seed, offsets)`."""
    out = [bytearray(d) for d in disks]
    for disk, off, data in _writes(seed, offsets):
        out[disk][off : off + len(data)] = data
    return [bytes(d) for d in out]


def _assert_made_like_the_source(hv: FailoverStack, name: str, folder: str) -> None:
    """The VM on hv02 has web01's captured configuration; its disks are differencing disks over the mount's
    VHDX files at web01's slots; Front is on the mapped switch, Back (DMZ unmapped) disconnected."""
    made, src = hv.dr.host.vm(name), hv.src.host.vm("web01")
    assert {k: getattr(made, k) for k in CONFIGURED} == {k: getattr(src, k) for k in CONFIGURED}
    assert {k: getattr(made, k) for k in MEMORY} == {k: getattr(src, k) for k in MEMORY}
    assert [(d.controller_type, d.controller_number, d.controller_location) for d in made.disks] == [
        (d.controller_type, d.controller_number, d.controller_location) for d in src.disks
    ]
    assert all(d.chain[0].lower().startswith(folder.lower() + "\\") for d in made.disks), [d.chain for d in made.disks]
    assert all(len(d.chain) >= 2 for d in made.disks), "writes go to a differencing disk, never to the point"
    assert made.folder is not None and made.folder.lower().startswith(folder.lower()), made.folder  # New-VM -Path
    assert {(n.name, n.switch, n.mac, n.vlan_id) for n in made.nics} == {
        ("Front", "LAN-DR", "00155D0A0B0C", 12),
        ("Back", None, "000000000000", None),
    }


def _replicate(hv: FailoverStack) -> api.Session:
    s = hv.ctl.run_job()
    assert s.state == api.SESSION_STATE_SUCCEEDED, s.error
    return s


def test_failover_to_an_older_point_and_the_newest_with_undo_between(hv: FailoverStack) -> None:
    copies = []
    for i in range(3):
        _write(hv.src, "web01", 10 + i, (i * 2 * MiB + MiB,))
        _replicate(hv)
        copies.append(hv.source_disks())
    oldest = sorted(hv.ctl.points(), key=lambda p: p.create_time.ToDatetime())[0]

    # Failover to the oldest point: a new dynamic VHDX of the point under the mount, the VM made over it.
    op = hv.operate(api.REPLICA_OPERATION_FAILOVER, point=oldest.name)
    assert op.bytes_copied > 0, op
    where = hv.where()
    assert where.state == api.REPLICA_VM_STATE_FAILED_OVER and where.restore_point == oldest.name
    assert where.host == "hosts/hv02" and where.running_vm_name == REPLICA_NAME
    (folder,) = hv.mount_folders()
    _assert_made_like_the_source(hv, REPLICA_NAME, f"{VM_ROOT_HOST}\\{folder}")
    assert hv.dr.host.vm(REPLICA_NAME).state == "Running"
    assert hv.vm_disks(REPLICA_NAME) == copies[0]
    before = hv.replica_hash()
    _write(hv.dr, REPLICA_NAME, 99, (0, 5 * MiB))
    skipped = _replicate(hv)  # replication of the VM pauses
    assert not [d for v in skipped.vms for d in v.disks if d.bytes_sent], skipped
    assert hv.replica_hash() == before

    # Undo: everything written since is discarded, the replica is as it was, nothing is left on hv02.
    hv.operate(api.REPLICA_OPERATION_UNDO_FAILOVER)
    assert hv.where().state == api.REPLICA_VM_STATE_REPLICATING
    assert hv.replica_hash() == before
    assert hv.dr.host.find_vms(REPLICA_NAME) == [] and hv.mount_folders() == []

    # Failover to the newest: the replica's data file (hard-linked) is the differencing disk's parent.
    op = hv.operate(api.REPLICA_OPERATION_FAILOVER)
    assert op.bytes_copied == 0, op
    (folder,) = hv.mount_folders()
    _assert_made_like_the_source(hv, REPLICA_NAME, f"{VM_ROOT_HOST}\\{folder}")
    assert hv.vm_disks(REPLICA_NAME) == copies[2]
    _write(hv.dr, REPLICA_NAME, 77, (3 * MiB,))
    assert hv.replica_hash() == before, "the VM's writes never reach the replica"
    hv.operate(api.REPLICA_OPERATION_UNDO_FAILOVER)
    assert hv.replica_hash() == before and hv.mount_folders() == []


def test_failback_onto_the_original_vhdx_commit_and_replicate_again(hv: FailoverStack) -> None:
    _replicate(hv)
    hv.operate(api.REPLICA_OPERATION_FAILOVER)
    at_point = hv.vm_disks(REPLICA_NAME)
    _write(hv.dr, REPLICA_NAME, 77, (3 * MiB,))
    assert hv.vm_disks(REPLICA_NAME) == _patched(at_point, 77, (3 * MiB,))
    _failback_and_commit(hv)


def _failback_and_commit(hv: FailoverStack) -> None:
    failed_over = hv.vm_disks(REPLICA_NAME)
    with pytest.raises(grpc.RpcError) as refused:  # the original runs: its disks are not written
        hv.operate(api.REPLICA_OPERATION_FAILBACK)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "web01" in str(refused.value.details())
    originals = [hv.src.host.local(d.chain[0]) for d in hv.src.host.vm("web01").disks]
    inodes = [p.stat().st_ino for p in originals]
    asyncio.run(provider_for(hv.src).stop_vm(hv.src.host.vm("web01").id))  # the original off for the failback
    op = hv.operate(api.REPLICA_OPERATION_FAILBACK)
    assert op.blocks_differing == 2, op  # one 64 KiB write per disk, each in one block
    assert hv.source_disks() == failed_over
    assert [p.stat().st_ino for p in originals] == inodes, "written in place: the original VHDX files"
    # The failback's checkpoint of the failed-over VM is gone, and no reference point was kept for it.
    assert hv.dr.host.state.snapshots == [] and hv.dr.host.state.reference_points == []
    assert hv.src.host.vm("web01").state == "Running"
    assert hv.dr.host.vm(REPLICA_NAME).state == "Off"
    assert hv.where().state == api.REPLICA_VM_STATE_FAILED_BACK

    # Commit: the failed-over VM and its mount go; replication resumes from the original, comparing digests.
    hv.operate(api.REPLICA_OPERATION_COMMIT_FAILBACK)
    assert hv.where().state == api.REPLICA_VM_STATE_REPLICATING
    assert hv.dr.host.find_vms(REPLICA_NAME) == []
    deadline = time.monotonic() + 10
    while hv.mount_folders() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert hv.mount_folders() == []
    session = _replicate(hv)
    assert {d.change_mode for v in session.vms for d in v.disks} == {"compare"}
    _write(hv.src, "web01", 5, (MiB,))
    again = _replicate(hv)
    assert {d.change_mode for v in again.vms for d in v.disks} == {"ranges"}


def test_an_isolated_test_failover_while_replication_goes_on(hv: FailoverStack) -> None:
    _replicate(hv)
    at_point = hv.source_disks()
    op = hv.operate(api.REPLICA_OPERATION_TEST_FAILOVER, limit=3600)
    (test,) = hv.where().tests
    assert hv.where().state == api.REPLICA_VM_STATE_REPLICATING and test.host == "hosts/hv02"
    made = hv.dr.host.vm(test.vm_name)
    switch = f"vmrepl-isolated-{test.vm_name}"
    assert {n.switch for n in made.nics} == {switch}, "every NIC on the test's private switch, none on LAN-DR"
    assert any(w.name == switch and w.type == "Private" for w in hv.dr.host.state.switches)
    assert made.state == "Running" and op.restore_point == test.restore_point
    assert hv.vm_disks(test.vm_name) == at_point
    _write(hv.dr, test.vm_name, 55, (0,))

    # Replication goes on under the test; the test VM keeps its point, the replica gets the new data.
    _write(hv.src, "web01", 21, (MiB, 6 * MiB))
    s = _replicate(hv)
    assert {d.change_mode for v in s.vms for d in v.disks} == {"ranges"}
    assert hv.vm_disks(test.vm_name) == _patched(at_point, 55, (0,)), "the test VM reads its point and its writes"

    hv.operate(api.REPLICA_OPERATION_STOP_TEST)
    assert not hv.where().tests and hv.dr.host.find_vms(test.vm_name) == []
    assert switch not in {w.name for w in hv.dr.host.state.switches}
    assert hv.mount_folders() == []


def test_planned_failover_loses_nothing_then_permanent_failover_merges_on_the_host(hv: FailoverStack) -> None:
    _replicate(hv)
    _write(hv.src, "web01", 42, (MiB, 6 * MiB))  # after the last session, before the shutdown
    at_shutdown = hv.source_disks()
    hv.src.host.set_guest_shutdown("web01", "clean", polls=3)
    op = hv.operate(api.REPLICA_OPERATION_PLANNED_FAILOVER)
    assert hv.src.host.vm("web01").state == "Off", "shut down through the guest (InitiateShutdown)"
    assert "InitiateShutdown" in hv.src.host.calls and "RequestStateChange" not in hv.src.host.calls
    where = hv.where()
    assert where.state == api.REPLICA_VM_STATE_FAILED_OVER and where.restore_point == op.restore_point
    newest = sorted(hv.ctl.points(), key=lambda p: p.create_time.ToDatetime())[-1]
    assert op.restore_point == newest.name, "the last incremental's point"
    assert hv.vm_disks(REPLICA_NAME) == at_shutdown
    assert hv.dr.host.vm(REPLICA_NAME).state == "Running"

    # Permanent: hv02 merges the differencing disks into the mount's files with the VM running; the replica
    # and its points go, the VM leaves the job.
    _write(hv.dr, REPLICA_NAME, 5, (2 * MiB,))
    written = hv.vm_disks(REPLICA_NAME)
    hv.operate(api.REPLICA_OPERATION_PERMANENT_FAILOVER)
    assert hv.where().state == api.REPLICA_VM_STATE_PERMANENT
    assert not hv.ctl.points() and not hv.ctl.client().GetJob(api.GetJobRequest(name="jobs/job1")).vms
    assert not hv.replica(DISK_IDS[0]).exists()
    made = hv.dr.host.vm(REPLICA_NAME)
    assert made.state == "Running" and all(len(d.chain) == 1 for d in made.disks), [d.chain for d in made.disks]
    assert hv.vm_disks(REPLICA_NAME) == written
    assert not hv.ctl.target_stub().ListMounts(target_pb2.ListMountsRequest()).mounts  # the record went last


def test_a_failback_that_fails_leaves_the_original_as_it_was(hv: FailoverStack) -> None:
    _replicate(hv)
    hv.operate(api.REPLICA_OPERATION_FAILOVER)
    _write(hv.dr, REPLICA_NAME, 77, (3 * MiB,))
    asyncio.run(provider_for(hv.src).stop_vm(hv.src.host.vm("web01").id))
    original = hv.source_disks()
    mask = field_mask_pb2.FieldMask(paths=["retries"])
    hv.ctl.client().UpdateJob(api.UpdateJobRequest(job=api.Job(name="jobs/job1", retries=0), update_mask=mask))
    hv.dr.host.add_fault(faults.JobFails("CreateSnapshot", description="The VSS writer failed in the guest."))
    request = api.StartReplicaOperationRequest(
        job="jobs/job1", operation=api.REPLICA_OPERATION_FAILBACK, groups=[api.VmGroup(vms=["web01"])]
    )
    s = hv.ctl.wait_session(hv.ctl.client().StartReplicaOperation(request).name)
    assert s.state != api.SESSION_STATE_SUCCEEDED and "VSS writer failed" in s.error, s
    (vm,) = s.operation_vms
    assert vm.state == api.OPERATION_STEP_ROLLED_BACK, vm
    assert hv.where().state == api.REPLICA_VM_STATE_FAILED_OVER
    assert hv.source_disks() == original and hv.src.host.vm("web01").state == "Off"
    assert hv.dr.host.vm(REPLICA_NAME).state == "Running", "the failed-over VM runs again"
    assert not (hv.ctl.work / "datastore" / ".failback" / "job1").exists() or not any(
        (hv.ctl.work / "datastore" / ".failback" / "job1").iterdir()
    ), "the failback folder is removed"
