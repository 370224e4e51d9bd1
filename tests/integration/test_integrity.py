"""Sessions that must never say `succeeded` for a replica that differs from its source (issue 9)."""

from __future__ import annotations

import sqlite3
import time

import pytest

from tests.integration.controller_env import ControllerEnv
from tests.support.replicas import assert_replicas_identical
from vmrepl.extent import MiB
from vmrepl.v1 import controller_pb2 as api
from vmrepl.v1 import target_pb2

pytestmark = pytest.mark.integration


def test_a_vm_retried_in_its_session_replicates_its_new_checkpoint(ctl_raw: ControllerEnv) -> None:
    """Item 1: attempt 2 takes a new checkpoint, so its disks start a new pass; the first attempt's
    completed offsets must not make the target skip what was written while the VM waited."""
    ctl_raw.configure(vms=("vm1",), retries=1, retry_wait_seconds=3)
    assert ctl_raw.run_job().state == api.SESSION_STATE_SUCCEEDED
    vm = ctl_raw.vm("vm1")
    vm.write("disk0", 1 * MiB, b"\x11" * MiB)  # something for the incremental to send
    # A directory where the restore point list's temporary file goes: every disk completes, then the
    # commit fails and the VM waits for its retry.
    replica_dir = ctl_raw.replica("vm1").parents[2]
    blocker = replica_dir / "restore-points.json.tmp"
    blocker.mkdir()
    s = ctl_raw.client().StartJob(api.StartJobRequest(name="jobs/job1"))
    ctl_raw.wait_until(s.name, lambda x: any(v.state == api.VM_STATE_FAILED for v in x.vms), timeout=60)
    vm.write("disk0", 5 * MiB, b"\x5a" * MiB)  # while it waits: no checkpoint, straight to the disk
    blocker.rmdir()
    final = ctl_raw.wait_session(s.name, timeout=90)
    assert final.state == api.SESSION_STATE_SUCCEEDED, final.error
    assert final.vms[0].attempt == 2
    assert_replicas_identical(ctl_raw, ["vm1"])
    # And the next changed-range incremental has nothing it missed.
    nxt = ctl_raw.run_job()
    assert nxt.state == api.SESSION_STATE_SUCCEEDED
    assert_replicas_identical(ctl_raw, ["vm1"])


def test_tickets_expire_with_the_checkpoint_hold(ctl_raw: ControllerEnv) -> None:
    """Item 7: a ticket lives no longer than its checkpoint may be held, not a fixed 24 hours."""
    ctl_raw.configure(vms=("vm1",), checkpoint_hold_seconds=60)
    started = time.time()
    assert ctl_raw.run_job().state == api.SESSION_STATE_SUCCEEDED
    accepted = [e for e in ctl_raw.target.events() if e.get("event") == "ticket_accepted"]
    assert accepted and {e["proxy"] for e in accepted} == {"proxy"}
    for e in accepted:
        assert started + 50 <= int(str(e["expires_unix"])) <= time.time() + 61, e


def test_a_restore_point_only_the_target_has_is_deleted_by_the_next_commit(ctl_raw: ControllerEnv) -> None:
    """Found by the chaos loop with power cuts: the target committed a point and went down before it
    answered; the VM failed, so the database never recorded the point. The controller now asks again on a
    transient error (same point back), and the next commit deletes any point the database does not know."""
    ctl_raw.configure(vms=("vm1",))
    assert ctl_raw.run_job().state == api.SESSION_STATE_SUCCEEDED
    (orphan,) = ctl_raw.points()
    db = sqlite3.connect(ctl_raw.work / "controller" / "controller.db")
    with db:
        db.execute("DELETE FROM restore_points")  # as if the answer to the commit had been lost
    db.close()
    assert ctl_raw.run_job().state == api.SESSION_STATE_SUCCEEDED
    (point,) = ctl_raw.points()
    vm_id = ctl_raw.vm("vm1").manifest.id
    listed = ctl_raw.target_stub().ListRestorePoints(
        target_pb2.ListRestorePointsRequest(replica_path=f"replicas/job1/{vm_id}")
    )
    assert [p.id for p in listed.restore_points] == [point.name.rsplit("/", 1)[1]] != [orphan.name]
