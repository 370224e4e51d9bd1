"""Hyper-V through the whole stack: controller -> WinRM (unmodified pywinrm) -> the Hyper-V host stand-in ->
proxy (reading the checkpoint's frozen VHDX through its host_paths mapping) -> target (VHDX replica).

What the stand-in cannot prove (a real host's WMI behaviour) is listed in docs/hyperv.md."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2

from controller import lab
from tests.integration.hyperv_env import PASSWORD, HyperVStack, hyperv_stack
from tests.support.hyperv import faults
from vmrepl.extent import MiB
from vmrepl.v1 import common_pb2
from vmrepl.v1 import controller_pb2 as api

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def hv(tmp_path: Path, lab_certs: lab.LabCerts) -> Iterator[HyperVStack]:
    with hyperv_stack(tmp_path, lab_certs) as stack:
        yield stack


def _disks(s: api.Session) -> dict[str, api.DiskTask]:
    return {d.disk_id: d for v in s.vms for d in v.disks}


def test_full_then_rct_incremental_reads_only_the_changed_ranges(hv: HyperVStack) -> None:
    _full_then_incremental(hv)


def test_a_controller_over_http_with_ntlm_message_encryption(tmp_path: Path, lab_certs: lab.LabCerts) -> None:
    """The controller process's pywinrm over plain HTTP, NTLM-authenticated and every message sealed: the
    stand-in refuses anything unencrypted (HTTP 500, as Windows with AllowUnencrypted=false)."""
    with hyperv_stack(tmp_path, lab_certs, auth="ntlm") as hv:
        _full_then_incremental(hv)
        assert hv.hv.server.refused_unencrypted == 0


def _full_then_incremental(hv: HyperVStack) -> None:
    hv.configure()
    full = hv.ctl.run_job()
    assert full.state == api.SESSION_STATE_SUCCEEDED, full.error
    assert {d.change_mode for d in _disks(full).values()} == {"full"}
    hv.assert_replica_is_the_vm()
    assert hv.vmrepl_snapshots() == [], "the recovery checkpoint became the reference point"
    first_rp = {r.id for r in hv.hv.host.state.reference_points}
    assert len(first_rp) == 1

    hv.hv.host.write("web01", 0, 3 * MiB, b"\x5a" * 8192)
    hv.hv.host.write("web01", 0, 17 * MiB + 4096, b"\xa5" * 512)
    hv.hv.host.write("web01", 1, 5 * MiB, b"\x33" * 65536)
    inc = hv.ctl.run_job()
    assert inc.state == api.SESSION_STATE_SUCCEEDED, inc.error
    disks = _disks(inc)
    assert {d.change_mode for d in disks.values()} == {"ranges"}, {k: d.change_fallback for k, d in disks.items()}
    # Only the blocks holding the changed ranges were sent: two blocks of disk 0, one of disk 1; the rest was
    # skipped as unchanged without a read, but for the sampled verification's few unsent blocks.
    block = 1 * MiB
    for disk_id, changed in (("scsi0-0", 2), ("scsi0-1", 1)):
        d = disks[disk_id]
        assert d.bytes_data == changed * block, (disk_id, d.bytes_data)
        assert d.skipped.unchanged + d.skipped.zero + d.skipped.unallocated == d.disk_size - changed * block, d
        assert d.bytes_read <= (changed + d.sample.sampled_blocks) * block, d
    assert inc.stats.change_tracking_fallbacks == 0
    hv.assert_replica_is_the_vm()
    rps = {r.id for r in hv.hv.host.state.reference_points}
    assert len(rps) == 1 and not rps & first_rp, "the older reference point is dropped once the newer point is in"
    assert hv.vmrepl_snapshots() == []

    points = hv.ctl.points()
    config = json.loads(points[-1].vm_configuration)
    assert config["vm"]["generation"] == 2 and config["vm"]["processors"] == 2, config
    assert {d["controller_location"] for d in config["vm"]["disks"]} == {0, 1}


def test_a_lost_reference_point_falls_back_to_digests_with_the_reason_shown(hv: HyperVStack) -> None:
    hv.configure()
    assert hv.ctl.run_job().state == api.SESSION_STATE_SUCCEEDED
    (rp,) = hv.hv.host.state.reference_points
    hv.hv.host.vanish_reference_point(rp.id)
    hv.hv.host.write("web01", 0, 6 * MiB, b"\x77" * 4096)
    inc = hv.ctl.run_job()
    assert inc.state == api.SESSION_STATE_SUCCEEDED, inc.error
    disks = _disks(inc)
    assert {d.change_mode for d in disks.values()} == {"compare"}
    assert all("reference point" in d.change_fallback for d in disks.values()), disks
    assert inc.stats.change_tracking_fallbacks == 2
    shown = hv.ctl.cli("session", "show", inc.name.removeprefix("sessions/")).stdout
    assert "reference point" in shown and "compare" in shown, shown
    hv.assert_replica_is_the_vm()
    # The next incremental has a reference again (the one this session kept).
    hv.hv.host.write("web01", 1, 1 * MiB, b"\x01" * 512)
    again = hv.ctl.run_job()
    assert {d.change_mode for d in _disks(again).values()} == {"ranges"}, again
    hv.assert_replica_is_the_vm()


def _recovery_snapshot(hv: HyperVStack, vm_id: str, name: str) -> None:
    """A recovery snapshot as a controller killed after CreateSnapshot leaves it: made, its job polled done."""
    made = hv.hv.host.create_snapshot(vm_id, name=name)
    while made.job is not None and hv.hv.host.poll_job(made.job).state in (2, 3, 4, 5, 6):
        pass
    assert any(x.name == name for x in hv.hv.host.state.snapshots)


def _installation(hv: HyperVStack) -> str:
    with sqlite3.connect(hv.ctl.work / "controller" / "controller.db") as db:
        (row,) = db.execute("SELECT id FROM installation").fetchall()
    return str(row[0])


def test_a_stale_recovery_snapshot_is_removed_and_others_are_left_alone(hv: HyperVStack) -> None:
    """This installation's leftover goes; a user's checkpoint and another vmrepl installation's recovery
    checkpoint (a second controller replicating the same VM) are left alone."""
    vm = hv.hv.host.vm("web01")
    hv.configure()
    _recovery_snapshot(hv, vm.id, f"vmrepl-{_installation(hv)}-left-by-a-crash")
    _recovery_snapshot(hv, vm.id, "vmrepl-0a0b0c0d-another-installations")
    hv.hv.host.user_checkpoint(vm.id, "before the upgrade")
    hv.hv.host.write("web01", 0, 2 * MiB, b"\x42" * 4096)  # after all: in the newest AVHDX of the chain
    s = hv.ctl.run_job()
    assert s.state == api.SESSION_STATE_SUCCEEDED, s.error
    names = sorted(x.name for x in hv.hv.host.state.snapshots)
    assert names == ["before the upgrade", "vmrepl-0a0b0c0d-another-installations"], names
    hv.assert_replica_is_the_vm()  # read through the user's checkpoint chain
    log = hv.ctl.client().GetSessionLog(api.GetSessionLogRequest(name=s.name))
    assert any(e.event == "orphan_checkpoint_removed" for e in log.entries)


def test_a_checkpoint_held_for_a_killed_proxy_is_resumed_then_removed(tmp_path: Path, lab_certs: lab.LabCerts) -> None:
    with hyperv_stack(tmp_path, lab_certs, proxy_lost_seconds=3) as hv:
        hv.configure(bandwidth_limit_mbps=2)
        s = hv.ctl.client().StartJob(api.StartJobRequest(name="jobs/job1"))
        hv.ctl.wait_until(s.name, lambda x: any(d.committed_offset >= 2 * MiB for d in _disks(x).values()))
        hv.ctl.proxy.kill()
        lost = hv.ctl.wait_session(s.name, timeout=60)
        assert lost.state == api.SESSION_STATE_INCOMPLETE, lost.error
        assert len(hv.vmrepl_snapshots()) == 1, "held for the resume"
        hv.ctl.proxy.start()
        mask_paths = ["address"]
        hv.ctl.client().UpdateProxy(
            api.UpdateProxyRequest(
                proxy=api.Proxy(name="proxies/proxy1", address=hv.ctl.proxy.address),
                update_mask=field_mask_pb2.FieldMask(paths=mask_paths),
            )
        )
        hv.ctl.unlimit()
        resumed = hv.ctl.run_job()
        assert resumed.state == api.SESSION_STATE_SUCCEEDED, resumed.error
        assert "resume" in {d.start for d in _disks(resumed).values()}
        assert hv.vmrepl_snapshots() == []
        hv.assert_replica_is_the_vm()


def test_a_controller_killed_mid_transfer_continues_and_removes_the_checkpoint(hv: HyperVStack) -> None:
    hv.configure(bandwidth_limit_mbps=4)
    s = hv.ctl.client().StartJob(api.StartJobRequest(name="jobs/job1"))
    hv.ctl.wait_until(s.name, lambda x: any(d.committed_offset >= 1 * MiB for d in _disks(x).values()))
    hv.ctl.controller.kill()
    assert len(hv.vmrepl_snapshots()) == 1
    hv.ctl.restart_controller()
    hv.ctl.unlimit()
    done = hv.ctl.wait_session(s.name, timeout=120)
    assert done.state in (api.SESSION_STATE_SUCCEEDED, api.SESSION_STATE_INCOMPLETE), done.error
    if done.state != api.SESSION_STATE_SUCCEEDED:
        done = hv.ctl.run_job()
        assert done.state == api.SESSION_STATE_SUCCEEDED, done.error
    assert hv.vmrepl_snapshots() == []
    hv.assert_replica_is_the_vm()


def test_application_consistency_falls_back_or_fails_as_the_job_says(hv: HyperVStack) -> None:
    hv.configure(guest_processing=api.GuestProcessing(enabled=True, ignore_failures=True), retries=0)
    hv.hv.host.add_fault(faults.JobFails("CreateSnapshot", description="The VSS writer failed in the guest."))
    s = hv.ctl.run_job()
    assert s.state == api.SESSION_STATE_SUCCEEDED, s.error
    (vm,) = s.vms
    assert vm.consistency == common_pb2.CONSISTENCY_CRASH
    assert "VSS writer failed" in vm.consistency_fallback, vm
    hv.assert_replica_is_the_vm()

    stub = hv.ctl.client()
    job = api.Job(name="jobs/job1", guest_processing=api.GuestProcessing(enabled=True))
    stub.UpdateJob(api.UpdateJobRequest(job=job, update_mask=field_mask_pb2.FieldMask(paths=["guest_processing"])))
    hv.hv.host.add_fault(faults.JobFails("CreateSnapshot", description="The VSS writer failed in the guest."))
    required = hv.ctl.run_job()
    assert required.state == api.SESSION_STATE_FAILED
    assert "VSS writer failed" in required.vms[0].error, required.vms[0].error
    assert hv.vmrepl_snapshots() == []
    assert hv.hv.host.calls.count("CreateSnapshot") == 3, "required: no crash-consistent attempt after the failure"


def test_hosts_vms_and_credentials(hv: HyperVStack) -> None:
    hv.configure()
    listed = hv.ctl.cli("infra", "vms", "hv01").stdout
    assert "web01" in listed and "scsi0-1" in listed and "Virtual Hard Disks" in listed, listed
    stub = hv.ctl.client()
    with pytest.raises(grpc.RpcError) as refused:
        stub.CreateJob(
            api.CreateJobRequest(
                job_id="job2",
                job=api.Job(
                    host="hosts/hv01", target="targets/target", replica_root="j2", vms=[api.JobVm(vm="nosuchvm")]
                ),
            )
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "nosuchvm" in (refused.value.details() or "")
    assert hv.ctl.run_job().state == api.SESSION_STATE_SUCCEEDED
    # The password is nowhere it must not be: replies, the database, the logs, the CLI.
    replies = [
        str(stub.GetHost(api.GetHostRequest(name="hosts/hv01"))),
        str(stub.ListCredentials(api.ListCredentialsRequest())),
    ]
    replies.append(hv.ctl.cli("infra", "list").stdout)
    for text in replies:
        assert PASSWORD not in text
    for f in [*hv.ctl.work.rglob("*.log"), *(hv.ctl.work / "controller").rglob("*")]:
        if f.is_file():
            assert PASSWORD.encode() not in f.read_bytes(), f"the password is in {f}"


def test_a_host_older_than_2016_is_refused_with_the_reason(hv: HyperVStack) -> None:
    hv.configure()
    hv.hv.host.set_host(os_build=9600)
    s = hv.ctl.run_job()
    assert s.state == api.SESSION_STATE_FAILED
    assert "2016" in s.error, s.error
