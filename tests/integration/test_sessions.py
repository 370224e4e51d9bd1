"""Sessions through the controller: checkpoints hold, stop and SIGTERM leave disks resumable, crashes at
every state transition are recovered without losing or doubling a restore point."""

from __future__ import annotations

import datetime as dt
import signal
import sqlite3
import time

import grpc
import pytest
from google.protobuf import field_mask_pb2

from controller import lab
from controller.engine.journal import CRASH_EXIT_CODE
from tests.integration.controller_env import ControllerEnv
from tests.support.replicas import assert_replicas_identical, qemu_identical
from vmrepl.extent import MiB
from vmrepl.v1 import controller_pb2 as api
from vmrepl.v1 import target_pb2

pytestmark = pytest.mark.integration


def _disks(s: api.Session) -> dict[str, api.DiskTask]:
    return {f"{v.vm_name}/{d.disk_id}": d for v in s.vms for d in v.disks}


def _received_below(ctl: ControllerEnv, session: str, disk: str, offset: int) -> int:
    """Data bytes the target received for `disk` in `session` at offsets below `offset`."""
    sid = session.removeprefix("sessions/")
    events = [
        e
        for e in ctl.target.events()
        if e.get("event") == "batch_received" and e.get("session_id") == sid and e.get("disk_id") == disk
    ]
    return sum(int(str(e["data_bytes"])) for e in events if int(str(e["start"])) < offset)


def test_writes_during_a_session_wait_for_the_next(ctl_raw: ControllerEnv) -> None:
    ctl_raw.configure(vms=("vm1",), bandwidth_limit_mbps=4)
    stub = ctl_raw.client()
    s = stub.StartJob(api.StartJobRequest(name="jobs/job1"))
    ctl_raw.wait_until(s.name, lambda x: any(v.state == api.VM_STATE_TRANSFERRING for v in x.vms))
    vm = ctl_raw.vm("vm1")
    before = vm.read_current("disk0", 7 * MiB, MiB)
    vm.write("disk0", 7 * MiB, b"\xa5" * MiB)  # after the checkpoint: goes to the overlay
    assert ctl_raw.wait_session(s.name).state == api.SESSION_STATE_SUCCEEDED
    with open(ctl_raw.replica("vm1"), "rb") as f:
        f.seek(7 * MiB)
        assert f.read(MiB) == before, "the session replicated the checkpoint, not the later write"
    assert not (vm.state / "checkpoint.json").exists()  # removed, the overlay merged
    ctl_raw.unlimit()
    second = ctl_raw.run_job()
    assert second.state == api.SESSION_STATE_SUCCEEDED
    assert _disks(second)["vm1/disk0"].change_mode == "ranges"
    assert_replicas_identical(ctl_raw, ["vm1"])


def test_stop_then_start_resumes_from_the_committed_offsets(ctl_db: ControllerEnv) -> None:
    ctl_db.configure(vms=("vm1",), bandwidth_limit_mbps=2)
    stub = ctl_db.client()
    s = stub.StartJob(api.StartJobRequest(name="jobs/job1"))
    ctl_db.wait_until(
        s.name, lambda x: bool(_disks(x)) and all(d.committed_offset >= 2 * MiB for d in _disks(x).values())
    )
    stub.StopJob(api.StopJobRequest(name="jobs/job1"))
    stopped = ctl_db.wait_session(s.name)
    assert stopped.state == api.SESSION_STATE_INCOMPLETE
    assert [v.state for v in stopped.vms] == [api.VM_STATE_HELD]
    offsets = {k: d.committed_offset for k, d in _disks(stopped).items()}
    assert all(d.state == api.DISK_TASK_STATE_RESUMABLE for d in _disks(stopped).values())
    assert all(0 < o < 8 * MiB for o in offsets.values()), offsets
    assert (ctl_db.vm("vm1").state / "checkpoint.json").exists(), "the checkpoint is held for the resume"
    assert not ctl_db.points()

    ctl_db.unlimit()
    resumed = ctl_db.run_job()
    assert resumed.state == api.SESSION_STATE_SUCCEEDED, resumed.error
    for key, d in _disks(resumed).items():
        assert d.start == "resume", key
        # Nothing below the committed offset travels again except the sampled verification's blocks.
        assert _received_below(ctl_db, resumed.name, d.disk_id, offsets[key]) <= 16 * MiB
    opened = [
        e
        for e in ctl_db.target.events()
        if e.get("event") == "stream_opened" and e.get("session_id") == resumed.name.removeprefix("sessions/")
    ]
    assert {str(e["disk_id"]): int(str(e["resume_offset"])) for e in opened} == {
        k.split("/")[1]: v for k, v in offsets.items()
    }
    assert len(ctl_db.points()) == 1
    assert not (ctl_db.vm("vm1").state / "checkpoint.json").exists()
    assert_replicas_identical(ctl_db, ["vm1"])


def test_sigterm_stops_cleanly_and_the_next_run_resumes(ctl_raw: ControllerEnv) -> None:
    ctl_raw.configure(vms=("vm1",), bandwidth_limit_mbps=2)
    s = ctl_raw.client().StartJob(api.StartJobRequest(name="jobs/job1"))
    ctl_raw.wait_until(s.name, lambda x: any(d.committed_offset >= 2 * MiB for d in _disks(x).values()))
    proc = ctl_raw.controller.proc
    assert proc is not None
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    ctl_raw.restart_controller()
    stopped = ctl_raw.session(s.name)
    assert stopped.state == api.SESSION_STATE_INCOMPLETE
    assert {d.state for d in _disks(stopped).values()} <= {api.DISK_TASK_STATE_RESUMABLE, api.DISK_TASK_STATE_SUCCEEDED}
    ctl_raw.unlimit()
    resumed = ctl_raw.run_job()
    assert resumed.state == api.SESSION_STATE_SUCCEEDED, resumed.error
    assert "resume" in {d.start for d in _disks(resumed).values()}
    assert_replicas_identical(ctl_raw, ["vm1"])


def _crash_and_recover(ctl: ControllerEnv, n: int) -> bool:
    """Run a session with the controller set to exit after state change `n`, then restart it and let it
    recover. Returns whether the hook fired (False: the session has fewer than n changes)."""
    ctl.restart_controller(test_crash_at_transition=n)
    proc = ctl.controller.proc
    assert proc is not None
    try:
        ctl.client().StartJob(api.StartJobRequest(name="jobs/job1"), timeout=10)
    except grpc.RpcError as e:
        assert e.code() is grpc.StatusCode.UNAVAILABLE, e  # the hook fired inside StartJob itself
    deadline = time.monotonic() + 60
    newest: list[api.Session] | None = None
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            newest = ctl.client().ListSessions(api.ListSessionsRequest(page_size=1)).sessions
        except grpc.RpcError:
            newest = []  # the controller is exiting
        if newest and newest[0].state not in (api.SESSION_STATE_RUNNING, api.SESSION_STATE_STOPPING):
            break
        time.sleep(0.05)
    time.sleep(0.3)  # the hook may fire at the session's last change, right after it shows as ended
    crashed = proc.poll() is not None
    if crashed:
        assert proc.returncode == CRASH_EXIT_CODE
    ctl.restart_controller()
    last: api.Session = ctl.client().ListSessions(api.ListSessionsRequest(page_size=1)).sessions[0]
    final = ctl.wait_session(last.name)
    assert final.state == api.SESSION_STATE_SUCCEEDED, (n, final.error)
    return crashed


def _check_points(ctl: ControllerEnv, sessions: int) -> None:
    points = ctl.points()
    target = ctl.target_stub()
    for vm in ("vm1", "vm2"):
        vm_id = ctl.vm(vm).manifest.id
        mine = {p.name.rsplit("/", 1)[1] for p in points if p.vm_id == vm_id}
        assert len(mine) == sessions, (vm, len(mine), sessions)  # none lost, none counted twice
        listed = target.ListRestorePoints(target_pb2.ListRestorePointsRequest(replica_path=f"replicas/job1/{vm_id}"))
        assert {p.id for p in listed.restore_points} == mine
        assert not (ctl.vm(vm).state / "checkpoint.json").exists(), "no checkpoint left behind"


def test_controller_killed_at_every_state_transition_recovers(ctl_raw: ControllerEnv) -> None:
    ctl_raw.configure(restore_points_to_keep=1000)
    n, sessions = 1, 0
    while True:
        crashed = _crash_and_recover(ctl_raw, n)
        sessions += 1
        _check_points(ctl_raw, sessions)
        assert_replicas_identical(ctl_raw, ["vm1", "vm2"])
        if not crashed:
            break
        for i, (vm, disk) in enumerate(ctl_raw.disks()):  # something for the next incremental to carry
            ctl_raw.vm(vm).write(disk, ((n + i) % 8) * MiB, bytes([n % 251 + 1]) * 4096)
        n += 1
    assert n > 20, f"a two-VM, three-disk session should have more than 20 state changes, saw {n - 1}"


def test_a_held_checkpoint_past_its_deadline_is_released_and_the_disks_compared(ctl_raw: ControllerEnv) -> None:
    ctl_raw.configure(vms=("vm1",), bandwidth_limit_mbps=2)
    stub = ctl_raw.client()
    s = stub.StartJob(api.StartJobRequest(name="jobs/job1"))
    ctl_raw.wait_until(s.name, lambda x: any(d.committed_offset >= 2 * MiB for d in _disks(x).values()))
    stub.StopJob(api.StopJobRequest(name="jobs/job1"))
    held = ctl_raw.wait_session(s.name)
    assert held.state == api.SESSION_STATE_INCOMPLETE
    old_checkpoint = held.vms[0].checkpoint_id
    ctl_raw.controller.stop()
    db = sqlite3.connect(ctl_raw.work / "controller" / "controller.db")
    with db:  # as if the job's hold time (24 h by default) had passed
        db.execute("UPDATE held_checkpoints SET deadline = '2000-01-01 00:00:00.000000+00:00'")
    db.close()
    ctl_raw.restart_controller()
    ctl_raw.vm("vm1").write("disk0", 5 * MiB, b"\x5a" * 8192)  # a change the old checkpoint never saw
    ctl_raw.unlimit()
    after = ctl_raw.run_job()
    assert after.state == api.SESSION_STATE_SUCCEEDED, after.error
    assert after.vms[0].checkpoint_id != old_checkpoint
    resumable = {k for k, d in _disks(held).items() if d.state == api.DISK_TASK_STATE_RESUMABLE}
    for key, d in _disks(after).items():
        assert (d.start, d.change_mode) == (("compare", "compare") if key in resumable else ("fresh", "full")), key
    assert not (ctl_raw.vm("vm1").state / "checkpoint.json").exists()
    assert_replicas_identical(ctl_raw, ["vm1"])


def test_a_proxy_killed_mid_transfer_leaves_the_disks_resumable(ctl_raw: ControllerEnv) -> None:
    ctl_raw.restart_controller(proxy_lost_seconds=3)
    ctl_raw.configure(vms=("vm1",), bandwidth_limit_mbps=2)
    s = ctl_raw.client().StartJob(api.StartJobRequest(name="jobs/job1"))
    ctl_raw.wait_until(s.name, lambda x: any(d.committed_offset >= 2 * MiB for d in _disks(x).values()))
    ctl_raw.proxy.kill()
    lost = ctl_raw.wait_session(s.name, timeout=60)
    assert lost.state == api.SESSION_STATE_INCOMPLETE, lost.error
    assert {d.state for d in _disks(lost).values()} == {api.DISK_TASK_STATE_RESUMABLE}
    ctl_raw.proxy.start()  # on a new port: tell the controller
    mask = field_mask_pb2.FieldMask(paths=["address"])
    ctl_raw.client().UpdateProxy(
        api.UpdateProxyRequest(proxy=api.Proxy(name="proxies/proxy1", address=ctl_raw.proxy.address), update_mask=mask)
    )
    ctl_raw.unlimit()
    resumed = ctl_raw.run_job()
    assert resumed.state == api.SESSION_STATE_SUCCEEDED, resumed.error
    assert {d.start for d in _disks(resumed).values()} == {"resume"}
    assert_replicas_identical(ctl_raw, ["vm1"])


def test_a_failing_vm_is_retried_without_holding_up_the_others(ctl_raw: ControllerEnv) -> None:
    ctl_raw.configure(retries=2, retry_wait_seconds=2)
    # A file where vm1's replica folder must go: the target cannot prepare its disks, so vm1 fails.
    blocker = ctl_raw.work / "datastore" / "replicas" / "job1" / ctl_raw.vm("vm1").manifest.id
    blocker.parent.mkdir(parents=True)
    blocker.write_text("in the way")
    s = ctl_raw.client().StartJob(api.StartJobRequest(name="jobs/job1"))
    ctl_raw.wait_until(s.name, lambda x: any(v.vm_name == "vm1" and v.attempt == 2 for v in x.vms), timeout=30)
    now = ctl_raw.session(s.name)
    vm2 = next(v for v in now.vms if v.vm_name == "vm2")
    assert vm2.state == api.VM_STATE_DONE and vm2.restore_point, "vm2 finished while vm1 waited to retry"
    blocker.unlink()  # the cause goes away: the next attempt succeeds
    final = ctl_raw.wait_session(s.name, timeout=60)
    assert final.state == api.SESSION_STATE_SUCCEEDED, final.error
    vm1 = next(v for v in final.vms if v.vm_name == "vm1")
    assert vm1.state == api.VM_STATE_DONE and vm1.attempt >= 2 and "attempt 1:" in vm1.error
    assert len(ctl_raw.points()) == 2
    assert_replicas_identical(ctl_raw, ["vm1", "vm2"])


def test_a_vm_that_keeps_failing_fails_the_session_after_its_retries(ctl_raw: ControllerEnv) -> None:
    ctl_raw.configure(retries=1, retry_wait_seconds=1)
    blocker = ctl_raw.work / "datastore" / "replicas" / "job1" / ctl_raw.vm("vm2").manifest.id
    blocker.parent.mkdir(parents=True)
    blocker.write_text("in the way")
    final = ctl_raw.run_job()
    assert final.state == api.SESSION_STATE_FAILED
    by_name = {v.vm_name: v for v in final.vms}
    assert by_name["vm2"].state == api.VM_STATE_FAILED and by_name["vm2"].attempt == 2
    assert by_name["vm1"].state == api.VM_STATE_DONE  # the healthy VM got its restore point
    assert [p.vm_id for p in ctl_raw.points()] == [ctl_raw.vm("vm1").manifest.id]
    assert not (ctl_raw.vm("vm2").state / "checkpoint.json").exists()


def test_two_jobs_sharing_one_proxy_slot_take_turns(ctl_raw: ControllerEnv) -> None:
    vm3 = lab.create_raw_vm(ctl_raw.host, "vm3", size=8 * MiB, seed=14)
    lab.add_raw_disk(vm3, "disk1", 8 * MiB, seed=15)
    ctl_raw.configure(job="big", vms=("vm1", "vm2"), bandwidth_limit_mbps=4)
    ctl_raw.configure(job="small", vms=("vm3",), bandwidth_limit_mbps=4)
    stub = ctl_raw.client()
    mask = field_mask_pb2.FieldMask(paths=["max_tasks"])
    stub.UpdateProxy(api.UpdateProxyRequest(proxy=api.Proxy(name="proxies/proxy1", max_tasks=1), update_mask=mask))
    big = stub.StartJob(api.StartJobRequest(name="jobs/big"))
    ctl_raw.wait_until(big.name, lambda x: any(d.state == api.DISK_TASK_STATE_RUNNING for d in _disks(x).values()))
    small = stub.StartJob(api.StartJobRequest(name="jobs/small"))
    assert ctl_raw.wait_session(big.name).state == api.SESSION_STATE_SUCCEEDED
    assert ctl_raw.wait_session(small.name).state == api.SESSION_STATE_SUCCEEDED
    job_of = {big.name.removeprefix("sessions/"): "big", small.name.removeprefix("sessions/"): "small"}
    order = [job_of[str(e["session_id"])] for e in ctl_raw.controller.events() if e.get("event") == "task_starting"]
    assert order == ["big", "small", "big", "small", "big"], order  # not big, big, big, small, small


def test_tasks_move_off_a_dead_proxy_to_another_and_resume(ctl_raw: ControllerEnv) -> None:
    ctl_raw.restart_controller(proxy_lost_seconds=2)
    ctl_raw.configure(vms=("vm1",), bandwidth_limit_mbps=2)
    config = lab.proxy_config(
        ctl_raw.work, ctl_raw.certs, sources=ctl_raw.host, name="proxy2", batch_bytes=MiB, window_batches=4
    )
    proxy2 = lab.AgentProcess("proxy_agent", config, ctl_raw.work / "proxy2.log")
    proxy2.start()
    try:
        stub = ctl_raw.client()
        stub.CreateProxy(api.CreateProxyRequest(proxy_id="proxy2", proxy=api.Proxy(address=proxy2.address)))
        s = stub.StartJob(api.StartJobRequest(name="jobs/job1"))
        on_first = ctl_raw.wait_until(
            s.name,
            lambda x: any(d.proxy == "proxies/proxy1" and d.committed_offset >= 2 * MiB for d in _disks(x).values()),
        )
        moved = {k for k, d in _disks(on_first).items() if d.proxy == "proxies/proxy1"}
        ctl_raw.proxy.kill()
        final = ctl_raw.wait_session(s.name, timeout=90)
        assert final.state == api.SESSION_STATE_SUCCEEDED, final.error
        for key in moved:
            assert _disks(final)[key].proxy == "proxies/proxy2", key
        sid = s.name.removeprefix("sessions/")
        for key in moved:
            disk = key.split("/")[1]
            opens = [
                int(str(e["resume_offset"]))
                for e in ctl_raw.target.events()
                if e.get("event") == "stream_opened" and e.get("session_id") == sid and e.get("disk_id") == disk
            ]
            assert opens[0] == 0 and opens[-1] >= 2 * MiB, (disk, opens)  # resumed, not started over
        assert_replicas_identical(ctl_raw, ["vm1"])
    finally:
        proxy2.stop()


def test_the_backup_window_closing_stops_the_session_resumably(ctl_raw: ControllerEnv) -> None:
    # The scheduler's clock is set to 4 s before the end of an hour; the job may run in that hour only.
    now = dt.datetime.now(dt.UTC)
    fake = now.replace(minute=59, second=56, microsecond=0)
    ctl_raw.restart_controller(test_clock_offset_seconds=(fake - now).total_seconds())
    day = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")[fake.weekday()]
    window = api.Schedule(
        permitted=api.PermittedHours(**{day: [api.HourSpan(start_hour=fake.hour, end_hour=fake.hour + 1)]})
    )
    ctl_raw.configure(vms=("vm1",), bandwidth_limit_mbps=1, schedule=window)  # manual start, inside the window
    s = ctl_raw.client().StartJob(api.StartJobRequest(name="jobs/job1"))
    cut = ctl_raw.wait_session(s.name, timeout=30)
    assert cut.state == api.SESSION_STATE_INCOMPLETE, "the window's end stops it: incomplete, not failed"
    assert {d.state for d in _disks(cut).values()} == {api.DISK_TASK_STATE_RESUMABLE}
    assert any(e.get("event") == "backup_window_closed" for e in ctl_raw.controller.events())
    ctl_raw.restart_controller()
    mask = field_mask_pb2.FieldMask(paths=["schedule", "bandwidth_limit_mbps"])
    ctl_raw.client().UpdateJob(api.UpdateJobRequest(job=api.Job(name="jobs/job1"), update_mask=mask))
    resumed = ctl_raw.run_job()
    assert resumed.state == api.SESSION_STATE_SUCCEEDED, resumed.error
    assert {d.start for d in _disks(resumed).values()} == {"resume"}
    assert_replicas_identical(ctl_raw, ["vm1"])


def test_a_second_job_on_a_vm_never_removes_the_checkpoint_a_running_session_reads(ctl_raw: ControllerEnv) -> None:
    # Two jobs may replicate one VM (to different roots). job1 reads vm2 slowly; a guest write lands under
    # its checkpoint (in the overlay), far ahead of what it has read; job2 starts on the VM meanwhile. It
    # must not take job1's checkpoint for a crash's orphan and remove it: that merges the write into the
    # disk under job1's transfer, and job1 "succeeds" with a replica that is no state the VM ever had.
    ctl_raw.configure(job="job1", vms=("vm2",), bandwidth_limit_mbps=0.5, retries=0)
    ctl_raw.configure(job="job2", vms=("vm2",), retries=0)
    stub, vm = ctl_raw.client(), ctl_raw.vm("vm2")
    before = ctl_raw.work / "before.raw"
    before.write_bytes(vm.read_current("disk0", 0, vm.size("disk0")))
    data = before.read_bytes()
    last_data = max(o for o in range(0, len(data), MiB) if data[o : o + MiB].count(0) < MiB // 2)  # read, not a hole
    first = stub.StartJob(api.StartJobRequest(name="jobs/job1"))
    ctl_raw.wait_until(first.name, lambda s: bool(s.vms) and s.vms[0].state == api.VM_STATE_TRANSFERRING)
    vm.write("disk0", last_data, b"\xee" * 4096)
    second = ctl_raw.wait_session(stub.StartJob(api.StartJobRequest(name="jobs/job2")).name)
    assert second.state == api.SESSION_STATE_FAILED and "job job1" in second.vms[0].error, second.vms[0].error
    done = ctl_raw.wait_session(first.name)
    assert done.state == api.SESSION_STATE_SUCCEEDED, done.error
    assert qemu_identical(before, ctl_raw.replica("vm2", job="job1")), "job1's replica is not its checkpoint"
    assert not [e for e in ctl_raw.controller.events() if e.get("event") == "orphan_checkpoint_removed"]
    assert vm.read_current("disk0", last_data, 4096) == b"\xee" * 4096  # the guest's write is kept
    assert ctl_raw.run_job("job2").state == api.SESSION_STATE_SUCCEEDED  # once job1 has ended
    assert qemu_identical(vm.image("disk0"), ctl_raw.replica("vm2", job="job2"))
