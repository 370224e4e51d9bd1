"""A session stopped midway (`vmrepl job stop`) and continued by the next (`job start`) on a replica that
already has a restore point, as a new user tried it with real controller, proxy and target processes:
every point `restore-points list` shows stays restorable and exports exactly as the source was."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from google.protobuf import field_mask_pb2

from tests.integration.controller_env import ControllerEnv
from tests.support.replicas import qemu_identical
from vmrepl.extent import MiB
from vmrepl.v1 import controller_pb2 as api

pytestmark = pytest.mark.integration


def _limit(ctl: ControllerEnv, mbps: float) -> None:
    job = api.Job(name="jobs/job1", bandwidth_limit_mbps=mbps)
    mask = field_mask_pb2.FieldMask(paths=["bandwidth_limit_mbps"])
    ctl.client().UpdateJob(api.UpdateJobRequest(job=job, update_mask=mask))


def _export(ctl: ControllerEnv, point: str, disk: str) -> Path:
    out = ctl.work / f"{point}-{disk}.raw"
    ctl.cli("restore-points", "export", "job1", point, "--disk", disk, "--output", str(out))
    return out


def test_a_stopped_and_resumed_session_keeps_every_point(ctl_raw: ControllerEnv) -> None:
    ctl = ctl_raw
    ctl.configure(vms=("vm1",), restore_points_to_keep=3)
    assert ctl.run_job().state == api.SESSION_STATE_SUCCEEDED
    vm = ctl.vm("vm1")
    disks = [d.id for d in vm.manifest.disks]
    first = {d: ctl.work / f"at-first-{d}.raw" for d in disks}
    rng = random.Random(7)
    for d in disks:
        shutil.copyfile(vm.image(d), first[d])  # the source at the first point
        for block in range(vm.size(d) // MiB):  # every block changes: the next session sends every disk whole
            vm.write(d, block * MiB, rng.randbytes(MiB))

    _limit(ctl, 2)
    s = ctl.client().StartJob(api.StartJobRequest(name="jobs/job1"))
    ctl.wait_until(s.name, lambda x: any(d.committed_offset >= 2 * MiB for v in x.vms for d in v.disks))
    ctl.client().StopJob(api.StopJobRequest(name="jobs/job1"))
    assert ctl.wait_session(s.name).state == api.SESSION_STATE_INCOMPLETE
    _limit(ctl, 0)
    resumed = ctl.run_job()
    assert resumed.state == api.SESSION_STATE_SUCCEEDED, resumed.error
    assert "resume" in [d.start for v in resumed.vms for d in v.disks]

    listed = json.loads(ctl.cli("restore-points", "list", "job1", "--json").stdout)
    points = listed["replicas"][0]["restore_points"]
    assert [p.get("restorable", False) for p in points] == [True, True], points
    older, newest = (p["name"].rsplit("/", 1)[1] for p in points)
    for d in disks:
        assert qemu_identical(_export(ctl, newest, d), vm.image(d)), f"newest point, {d}"
        assert qemu_identical(_export(ctl, older, d), first[d]), f"older point, {d}"
