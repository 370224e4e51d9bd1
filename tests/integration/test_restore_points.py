"""Restore points with data, end to end with real controller, proxy and target processes: every point kept
exports as the source was at its session; a failed session leaves the replica exactly at the last point; a
stopped one resumes; VHDX replicas pass qemu-img check and read back with dissect.hypervisor."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from google.protobuf import field_mask_pb2, json_format

from tests.conftest import need_tool
from tests.integration.controller_env import ControllerEnv
from tests.support.replicas import qemu_identical, sha256
from vmrepl.extent import MiB
from vmrepl.providers.filehost import FileHostProvider
from vmrepl.v1 import common_pb2
from vmrepl.v1 import controller_pb2 as api

pytestmark = pytest.mark.integration

DISKS = ("disk0", "disk1")


def _snapshot(ctl: ControllerEnv, tag: str) -> dict[str, Path]:
    """A copy of vm1's disks now: what a point taken from the next checkpoint must hold."""
    out = {}
    for disk in DISKS:
        copy = ctl.work / f"source-{tag}-{disk}.raw"
        subprocess.run(["cp", "--sparse=always", str(ctl.vm("vm1").image(disk)), str(copy)], check=True)
        out[disk] = copy
    return out


def _replica(ctl: ControllerEnv, vm: str = "vm1") -> api.JobReplica:
    replicas = ctl.client().ListJobReplicas(api.ListJobReplicasRequest(parent="jobs/job1")).replicas
    found: list[api.JobReplica] = [r for r in replicas if r.vm_name == vm]
    assert len(found) == 1, replicas
    return found[0]


def _export(ctl: ControllerEnv, point: str, disk: str, fmt: str = "raw") -> Path:
    out = ctl.work / f"export-{point[:8]}-{disk}.{fmt}"
    args = ["restore-points", "export", "job1", point, "--vm", "vm1", "--disk", disk, "--output", str(out)]
    ctl.cli(*args, "--format", fmt)
    return out


def test_three_sessions_retention_two_and_every_kept_point_exports_as_its_source(ctl_raw: ControllerEnv) -> None:
    need_tool("qemu-img")
    ctl = ctl_raw
    ctl.configure(vms=("vm1",), restore_points_to_keep=2)
    sources = []
    for i in range(3):
        if i:
            ctl.cli("lab", "write", str(ctl.host), "vm1", "--disk", DISKS[i % 2], "--blocks", "3", "--seed", str(i))
        sources.append(_snapshot(ctl, str(i)))
        assert ctl.run_job().state == api.SESSION_STATE_SUCCEEDED
    replica = _replica(ctl)
    assert replica.state == common_pb2.REPLICA_STATE_AT_POINT
    kept = list(replica.restore_points)
    assert len(kept) == 2 and all(p.restorable for p in kept), json_format.MessageToJson(replica)
    for point, source in zip(kept, sources[1:], strict=True):
        point_id = point.name.rsplit("/", 1)[1]
        for disk in DISKS:
            assert qemu_identical(_export(ctl, point_id, disk), source[disk]), f"{point_id}/{disk}"
    oldest = kept[0].name.rsplit("/", 1)[1]
    vhdx = _export(ctl, oldest, "disk1", "vhdx")
    assert subprocess.run(["qemu-img", "check", "-q", str(vhdx)], check=False).returncode == 0
    same = ["qemu-img", "compare", "-q", "-f", "vhdx", "-F", "raw", str(vhdx), str(sources[1]["disk1"])]
    assert subprocess.run(same, check=False).returncode == 0
    assert ctl.cli("replica", "verify", "job1", "--vm", "vm1", "--point", oldest).returncode == 0
    listed = ctl.cli("restore-points", "list", "job1").stdout
    assert "at restore point" in listed and listed.count("yes") >= 2, listed


def _limit(ctl: ControllerEnv, mbps: float) -> None:
    mask = field_mask_pb2.FieldMask(paths=["bandwidth_limit_mbps"])
    ctl.client().UpdateJob(
        api.UpdateJobRequest(job=api.Job(name="jobs/job1", bandwidth_limit_mbps=mbps), update_mask=mask)
    )


def _wait_written(ctl: ControllerEnv, session: str, at_point: dict[str, str]) -> None:
    """Until the session has overwritten part of the replica (so what follows has something to undo)."""
    ctl.wait_until(session, lambda s: any(d.state == api.DISK_TASK_STATE_RUNNING for v in s.vms for d in v.disks))
    deadline = time.monotonic() + 60
    while all(sha256(ctl.replica("vm1", d)) == at_point[d] for d in DISKS):
        assert time.monotonic() < deadline, "the session wrote nothing to the replica"
        time.sleep(0.1)


def test_a_failed_session_leaves_the_replica_exactly_at_the_last_point(ctl_raw: ControllerEnv) -> None:
    ctl = ctl_raw
    ctl.configure(vms=("vm1",), retries=0)
    assert ctl.run_job().state == api.SESSION_STATE_SUCCEEDED
    at_point = {d: sha256(ctl.replica("vm1", d)) for d in DISKS}
    for disk in DISKS:
        ctl.cli("lab", "write", str(ctl.host), "vm1", "--disk", disk, "--blocks", "8", "--seed", "7")
    _limit(ctl, 2)
    started = ctl.client().StartJob(api.StartJobRequest(name="jobs/job1"))
    _wait_written(ctl, started.name, at_point)
    # The checkpoint goes while its disks are read: what was read is no consistent image, so the session
    # fails for good (not resumable) and must leave the replica exactly at its last point.
    vm = FileHostProvider(ctl.host).vm("vm1")
    (checkpoint,) = vm.list_checkpoints()
    vm.remove_checkpoint(checkpoint.checkpoint_id)
    ended = ctl.wait_session(started.name)
    assert ended.state == api.SESSION_STATE_FAILED, json_format.MessageToJson(ended)
    assert {d: sha256(ctl.replica("vm1", d)) for d in DISKS} == at_point
    replica = _replica(ctl)
    assert replica.state == common_pb2.REPLICA_STATE_AT_POINT
    assert replica.rolled_back_session == started.name, json_format.MessageToJson(replica)
    assert "rolled back" in ctl.cli("restore-points", "list", "job1").stdout
    ctl.unlimit()
    assert ctl.run_job().state == api.SESSION_STATE_SUCCEEDED  # and the next session goes on from the point
    for disk in DISKS:
        assert qemu_identical(ctl.replica("vm1", disk), ctl.vm("vm1").image(disk))


def test_a_stopped_session_is_kept_for_its_resume_and_rolled_back_on_request(ctl_raw: ControllerEnv) -> None:
    ctl = ctl_raw
    ctl.configure(vms=("vm1",))
    assert ctl.run_job().state == api.SESSION_STATE_SUCCEEDED
    at_point = {d: sha256(ctl.replica("vm1", d)) for d in DISKS}
    for disk in DISKS:
        ctl.cli("lab", "write", str(ctl.host), "vm1", "--disk", disk, "--blocks", "8", "--seed", "9")
    _limit(ctl, 2)
    started = ctl.client().StartJob(api.StartJobRequest(name="jobs/job1"))
    _wait_written(ctl, started.name, at_point)
    ctl.client().StopJob(api.StopJobRequest(name="jobs/job1"))
    assert ctl.wait_session(started.name).state == api.SESSION_STATE_INCOMPLETE
    replica = _replica(ctl)
    assert (replica.state, replica.session) == (common_pb2.REPLICA_STATE_RESUMABLE, started.name)
    assert "resumable" in ctl.cli("restore-points", "list", "job1").stdout
    # On request, the replica goes back to its point exactly ...
    ctl.cli("replica", "rollback", "job1", "--vm", "vm1")
    assert {d: sha256(ctl.replica("vm1", d)) for d in DISKS} == at_point
    assert _replica(ctl).state == common_pb2.REPLICA_STATE_AT_POINT
    # ... the held checkpoint is released (nothing is left to resume), and the next session replicates anew.
    ctl.unlimit()
    assert ctl.run_job().state == api.SESSION_STATE_SUCCEEDED
    for disk in DISKS:
        assert qemu_identical(ctl.replica("vm1", disk), ctl.vm("vm1").image(disk))


def test_vhdx_replicas_pass_qemu_img_check_and_read_back_with_dissect(ctl_raw: ControllerEnv) -> None:
    need_tool("qemu-img")
    from dissect.hypervisor.disk.vhdx import VHDX

    ctl = ctl_raw
    ctl.configure(vms=("vm1",), replica_format=common_pb2.DISK_FORMAT_VHDX)
    assert ctl.run_job().state == api.SESSION_STATE_SUCCEEDED
    first = _snapshot(ctl, "first")
    ctl.cli("lab", "write", str(ctl.host), "vm1", "--disk", "disk0", "--blocks", "4", "--seed", "5")
    assert ctl.run_job().state == api.SESSION_STATE_SUCCEEDED
    for disk in DISKS:
        replica = ctl.replica("vm1", disk).with_name("data.vhdx")
        assert not replica.with_name("data.raw").exists()
        assert subprocess.run(["qemu-img", "check", "-q", str(replica)], check=False).returncode == 0
        same = ["qemu-img", "compare", "-q", "-f", "vhdx", "-F", "raw", str(replica), str(ctl.vm("vm1").image(disk))]
        assert subprocess.run(same, check=False).returncode == 0, disk
        with open(replica, "rb") as f:
            read = VHDX(f)
            data = read.read(read.size)
        assert data == ctl.vm("vm1").image(disk).read_bytes(), disk
    oldest = _replica(ctl).restore_points[0].name.rsplit("/", 1)[1]
    assert qemu_identical(_export(ctl, oldest, "disk0"), first["disk0"])
    assert ctl.vm("vm1").image("disk0").stat().st_size == 8 * MiB
