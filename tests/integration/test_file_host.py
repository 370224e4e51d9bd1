"""The file-backed provider under a real controller, proxy and target: VM ids, bad manifests, planted files
and symbolic links, and guest writes under a checkpoint across kill -9 and a simulated power cut."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2

from controller import lab
from tests.conftest import need_tool
from tests.integration.controller_env import ControllerEnv
from tests.powercut import Recorder
from tests.support.replicas import assert_replicas_identical
from vmrepl.extent import MiB
from vmrepl.providers.filehost import load_manifest, write_manifest
from vmrepl.v1 import controller_pb2 as api

pytestmark = pytest.mark.integration

SECRET = b"TOP-SECRET-" * 372  # 4092 bytes a root-only file holds, outside the host folder


def _by_name(s: api.Session) -> dict[str, api.SessionVm]:
    return {v.vm_name: v for v in s.vms}


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "controller.cli", *args], capture_output=True, text=True, check=False)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()  # compared instead of megabytes, which pytest would diff


def _copy_vm(host: Path, src: str, dst: str, *, name: str, disk_mib: int, fill: bytes) -> None:
    """A copy of a VM folder as an operator would make it (same id), renamed, with other disk content."""
    shutil.copytree(host / src, host / dst, ignore=shutil.ignore_patterns(".vmrepl"))
    manifest = load_manifest(host / dst)
    write_manifest(host / dst, manifest.model_copy(update={"name": name}))
    for d in manifest.disks:
        (host / dst / d.path).write_bytes(fill * (disk_mib * MiB))


# ---- item 3: VM ids -----------------------------------------------------------------------------------


def test_lab_create_vm_gives_each_vm_a_random_id(tmp_path: Path) -> None:
    for tool in ("sfdisk", "mkntfs", "ntfscp", "mkswap"):
        need_tool(tool)
    for name in ("web01", "db01"):
        out = _cli("lab", "create-vm", str(tmp_path), name, "--size-mib", "64", "--seed", "1")
        assert out.returncode == 0, out.stderr
    assert load_manifest(tmp_path / "web01").id != load_manifest(tmp_path / "db01").id


def test_a_shared_vm_id_is_refused_and_fails_only_the_vms_sharing_it(ctl_raw: ControllerEnv) -> None:
    ctl_raw.configure(vms=("vm0", "vm1", "vm2"), retries=0)
    ctl_raw.configure(job="job2", vms=("vm2",), retries=0)
    # vm0 is a copy of vm2's folder (same id) with a smaller disk of other bytes; it sorts first.
    _copy_vm(ctl_raw.host, "vm2", "vm0", name="vm0", disk_mib=4, fill=b"\x77")
    with pytest.raises(grpc.RpcError) as refused:
        ctl_raw.client().CreateHost(
            api.CreateHostRequest(host_id="lab2", host=api.Host(provider="file", address=str(ctl_raw.host)))
        )
    assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "vm0" in str(refused.value.details()) and "vm2" in str(refused.value.details())

    both = ctl_raw.run_job()
    vms = _by_name(both)
    assert vms["vm1"].state == api.VM_STATE_DONE and vms["vm1"].restore_point, both.error
    for name in ("vm0", "vm2"):
        assert vms[name].state == api.VM_STATE_FAILED, (name, vms[name].state)
        assert "vm0" in vms[name].error and "vm2" in vms[name].error, vms[name].error
        assert "IntegrityError" not in vms[name].error and "internal" not in vms[name].error
    assert_replicas_identical(ctl_raw, ["vm1"])

    alone = ctl_raw.run_job("job2")  # named by name: before, vm0's disk was replicated as vm2's
    assert alone.state == api.SESSION_STATE_FAILED, "a job must not replicate another folder's disk"
    assert "vm0" in alone.vms[0].error and "vm2" in alone.vms[0].error
    assert not (ctl_raw.work / "datastore" / "replicas" / "job2").exists()


def test_references_resolve_by_id_then_by_a_unique_name(ctl_raw: ControllerEnv) -> None:
    twin = lab.create_raw_vm(ctl_raw.host, "vm3", size=4 * MiB, seed=3)
    shutil.copytree(twin, ctl_raw.host / "vm3b", ignore=shutil.ignore_patterns(".vmrepl"))
    manifest = load_manifest(ctl_raw.host / "vm3b")  # the same name, its own id
    write_manifest(ctl_raw.host / "vm3b", manifest.model_copy(update={"id": "3b3b3b3b-0000-4000-8000-000000000001"}))
    vm1_id, vm2_id = ctl_raw.vm("vm1").manifest.id, ctl_raw.vm("vm2").manifest.id
    twice = ("vm2", vm2_id)  # one VM named by its name and by its id: planned once, not an IntegrityError
    ctl_raw.configure(vms=(vm1_id, "vm3", "3b3b3b3b-0000-4000-8000-000000000001", *twice), retries=0)
    s = ctl_raw.run_job()
    assert [v.vm_id for v in s.vms].count(vm2_id) == 1 and "internal" not in s.error, s.error
    by_id = {v.vm_id: v for v in s.vms}
    assert by_id[vm1_id].state == api.VM_STATE_DONE and by_id[vm2_id].state == api.VM_STATE_DONE, s.error  # by id
    assert by_id["3b3b3b3b-0000-4000-8000-000000000001"].state == api.VM_STATE_DONE, (
        s.error
    )  # by id, though its name is shared
    ambiguous = by_id["vm3"]  # by a name two folders carry
    assert ambiguous.state == api.VM_STATE_FAILED and "ambiguous" in ambiguous.error, ambiguous.error
    assert "vm3b" in ambiguous.error and load_manifest(twin).id in ambiguous.error


def test_a_disk_whose_size_changed_after_planning_fails(ctl_raw: ControllerEnv) -> None:
    ctl_raw.configure(vms=("vm1", "vm2"), retries=0)
    ctl_raw.restart_controller(test_crash_at_transition=2)  # exits right after "session planned"
    proc = ctl_raw.controller.proc
    assert proc is not None
    try:
        ctl_raw.client().StartJob(api.StartJobRequest(name="jobs/job1"), timeout=10)
    except grpc.RpcError as e:
        assert e.code() is grpc.StatusCode.UNAVAILABLE, e  # the hook fired inside StartJob itself
    proc.wait(30)
    with open(ctl_raw.vm("vm2").image("disk0"), "r+b") as f:  # the disk grows before its checkpoint
        f.truncate(9 * MiB)
    ctl_raw.restart_controller()
    last = ctl_raw.client().ListSessions(api.ListSessionsRequest(page_size=1)).sessions[0]
    s = ctl_raw.wait_session(last.name)
    vms = _by_name(s)
    assert vms["vm1"].state == api.VM_STATE_DONE, s.error
    assert vms["vm2"].state == api.VM_STATE_FAILED and "size" in vms["vm2"].error, vms["vm2"].error
    assert str(8 * MiB) in vms["vm2"].error and str(9 * MiB) in vms["vm2"].error
    assert ctl_raw.run_job().state == api.SESSION_STATE_SUCCEEDED  # planned again with the new size
    assert_replicas_identical(ctl_raw, ["vm2"])


# ---- item 4: bad manifests ----------------------------------------------------------------------------


def test_a_bad_manifest_fails_only_its_own_vm(ctl_raw: ControllerEnv) -> None:
    host = ctl_raw.host
    (host / "bad1").mkdir()
    (host / "bad1" / "vm.toml").write_text('name = "bad1"\nid = \n')  # not TOML
    lab.create_raw_vm(host, "bad2", size=MiB, seed=21)
    with open(host / "bad2" / "vm.toml", "a") as f:
        f.write('colour = "blue"\n')  # an unknown key
    lab.create_raw_vm(host, "bad3", size=MiB, seed=22)
    outside = ctl_raw.work / "outside.raw"
    outside.write_bytes(SECRET)
    (host / "bad3" / "disk0.raw").unlink()
    (host / "bad3" / "disk0.raw").symlink_to(outside)  # a disk that lies outside the VM folder
    ctl_raw.configure(vms=("vm1", "vm2", "bad1", "bad2", "bad3"), retries=0)
    s = ctl_raw.run_job()
    vms = _by_name(s)
    assert vms["vm1"].state == api.VM_STATE_DONE and vms["vm2"].state == api.VM_STATE_DONE, s.error
    assert "vm.toml" in vms["bad1"].error and "TOML" in vms["bad1"].error, vms["bad1"].error
    assert "colour" in vms["bad2"].error, vms["bad2"].error
    assert "disk0.raw" in vms["bad3"].error and "symbolic link" in vms["bad3"].error, vms["bad3"].error
    assert all(vms[b].state == api.VM_STATE_FAILED for b in ("bad1", "bad2", "bad3"))
    assert_replicas_identical(ctl_raw, ["vm1", "vm2"])


# ---- item 5: planted files and symbolic links ------------------------------------------------------------


def _root_only_secret(work: Path) -> Path:
    secret = work / "root-only" / "shadow"
    secret.parent.mkdir()
    secret.write_bytes(SECRET)
    secret.chmod(0o400)
    return secret


def test_a_planted_merge_record_is_refused_not_merged(ctl_raw: ControllerEnv) -> None:
    secret = _root_only_secret(ctl_raw.work)
    state = ctl_raw.host / "vm1" / ".vmrepl"
    (state / "overlay").mkdir(parents=True)
    record = '{"id": "00000000000000000000000000000001", "created_at": 0, "reference": 0, "state": "merging"}'
    (state / "checkpoint.json").write_text(record)
    (state / "overlay" / "disk0.map").write_text(f"[0, {len(SECRET)}]\n")
    (state / "overlay" / "disk0.raw").symlink_to(secret)
    ctl_raw.configure(vms=("vm1", "vm2"), retries=0)
    s = ctl_raw.run_job()
    vms = _by_name(s)
    assert vms["vm2"].state == api.VM_STATE_DONE, s.error
    assert vms["vm1"].state == api.VM_STATE_FAILED, "a checkpoint record vmrepl did not write must not be merged"
    assert "checkpoint.json" in vms["vm1"].error and "not written by vmrepl" in vms["vm1"].error
    assert SECRET not in ctl_raw.vm("vm1").image("disk0").read_bytes()[: 2 * len(SECRET)]
    replica = ctl_raw.replica("vm1")
    assert not replica.exists() or SECRET not in replica.read_bytes()[: 2 * len(SECRET)]


def test_scans_create_nothing_and_symlinked_folders_are_refused(ctl_raw: ControllerEnv) -> None:
    elsewhere = ctl_raw.work / "elsewhere"
    elsewhere.mkdir()
    lab.create_raw_vm(elsewhere, "vm3", size=2 * MiB, seed=5)
    (ctl_raw.host / "vm3").symlink_to(elsewhere / "vm3", target_is_directory=True)
    outside_state = ctl_raw.work / "outside-state"
    outside_state.mkdir()
    (ctl_raw.host / "vm2" / ".vmrepl").symlink_to(outside_state, target_is_directory=True)
    lab.create_raw_vm(ctl_raw.host, "vm4", size=2 * MiB, seed=6)  # in no job: only ever scanned
    ctl_raw.configure(vms=("vm1", "vm2", "vm3"), retries=0)
    s = ctl_raw.run_job()
    vms = _by_name(s)
    assert vms["vm1"].state == api.VM_STATE_DONE, s.error
    assert vms["vm2"].state == api.VM_STATE_FAILED and ".vmrepl" in vms["vm2"].error, vms["vm2"].error
    assert "symbolic link" in vms["vm2"].error
    assert vms["vm3"].state == api.VM_STATE_FAILED and "symbolic link" in vms["vm3"].error, vms["vm3"].error
    assert list(outside_state.iterdir()) == [], "nothing is written through a symlinked .vmrepl"
    assert not (elsewhere / "vm3" / ".vmrepl").exists(), "nothing is written through a symlinked VM folder"
    assert not (ctl_raw.host / "vm4" / ".vmrepl").exists(), "a scan creates nothing"
    assert_replicas_identical(ctl_raw, ["vm1"])


# ---- item 16: guest writes under a checkpoint are durable ------------------------------------------------


def _start_under_checkpoint(ctl: ControllerEnv) -> str:
    ctl.configure(vms=("vm1",), bandwidth_limit_mbps=1, retries=0)
    s = ctl.client().StartJob(api.StartJobRequest(name="jobs/job1"))
    ctl.wait_until(s.name, lambda x: any(v.state == api.VM_STATE_TRANSFERRING for v in x.vms))
    return str(s.name)


def _recover(ctl: ControllerEnv, name: str) -> None:
    """After kill -9 of the controller and the proxy: start them again and let the session finish."""
    ctl.proxy.start()
    ctl.restart_controller(proxy_lost_seconds=3)
    mask = field_mask_pb2.FieldMask(paths=["address"])  # the proxy listens on a new port
    ctl.client().UpdateProxy(
        api.UpdateProxyRequest(proxy=api.Proxy(name="proxies/proxy1", address=ctl.proxy.address), update_mask=mask)
    )
    ctl.unlimit()
    final = ctl.wait_session(name)
    assert final.state in (api.SESSION_STATE_SUCCEEDED, api.SESSION_STATE_INCOMPLETE), final.error
    if final.state == api.SESSION_STATE_INCOMPLETE:  # the checkpoint was held: the next session releases it
        assert ctl.run_job().state == api.SESSION_STATE_SUCCEEDED


def test_guest_writes_acknowledged_under_a_checkpoint_survive_a_power_cut(ctl_raw: ControllerEnv) -> None:
    name = _start_under_checkpoint(ctl_raw)
    state = ctl_raw.work / "powercut.state"
    writer = [sys.executable, "-m", "tests.powercut", str(state), str(ctl_raw.host), "controller.cli"]
    writer += ["lab", "write", str(ctl_raw.host), "vm1", "--blocks", "5", "--length", "70000", "--seed", "9"]
    out = subprocess.run(writer, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr  # every write acknowledged
    vm = ctl_raw.vm("vm1")
    size = vm.size("disk0")
    acknowledged = _digest(vm.read_current("disk0", 0, size))
    assert acknowledged != _digest(vm.image("disk0").read_bytes()), "the writes went to the checkpoint's overlay"

    ctl_raw.controller.kill()
    ctl_raw.proxy.kill()
    Recorder.load(state).cut()  # the power cut: what the writer did not fsync is gone
    with open(vm.state / "overlay" / "disk0.map", "ab") as m:
        m.write(b"[52428")  # and an append the cut tore in the middle
    assert _digest(vm.read_current("disk0", 0, size)) == acknowledged, "the guest lost acknowledged writes"
    _recover(ctl_raw, name)
    assert _digest(vm.image("disk0").read_bytes()) == acknowledged, "the merge lost acknowledged writes"
    assert ctl_raw.run_job().state == api.SESSION_STATE_SUCCEEDED
    assert_replicas_identical(ctl_raw, ["vm1"])


def test_a_guest_writer_killed_mid_write_leaves_a_consistent_merge(ctl_raw: ControllerEnv) -> None:
    name = _start_under_checkpoint(ctl_raw)
    writer = [sys.executable, "-m", "controller.cli", "lab", "write", str(ctl_raw.host), "vm1"]
    proc = subprocess.Popen([*writer, "--blocks", "8", "--length", str(MiB), "--seed", "4"])
    overlay_map = ctl_raw.host / "vm1" / ".vmrepl" / "overlay" / "disk0.map"
    deadline = time.monotonic() + 30
    while proc.poll() is None and time.monotonic() < deadline:
        if overlay_map.exists() and overlay_map.stat().st_size > 0:
            break
        time.sleep(0.002)
    proc.kill()
    proc.wait()
    ctl_raw.controller.kill()
    ctl_raw.proxy.kill()
    vm = ctl_raw.vm("vm1")
    seen = _digest(vm.read_current("disk0", 0, vm.size("disk0")))  # what the guest sees after the kill
    _recover(ctl_raw, name)
    assert _digest(vm.image("disk0").read_bytes()) == seen, "the merge must give exactly what the guest saw"
    assert not os.path.exists(vm.state / "checkpoint.json")
    assert ctl_raw.run_job().state == api.SESSION_STATE_SUCCEEDED
    assert_replicas_identical(ctl_raw, ["vm1"])
