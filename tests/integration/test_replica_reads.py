"""`vmrepl replica verify` and `vmrepl restore-points export` with real controller, proxy and target
processes: after a session the export equals the source disk (qemu-img compare), a corruption planted in
the replica is reported at its offset, and what must be refused is."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from tests.conftest import need_tool
from tests.integration.controller_env import ControllerEnv
from tests.support.certs import tls_settings
from tests.support.replicas import qemu_identical
from vmrepl.extent import MiB
from vmrepl.security.tls import channel_credentials
from vmrepl.v1 import controller_pb2 as api
from vmrepl.v1 import target_pb2, target_pb2_grpc

pytestmark = pytest.mark.integration

EXIT_MISMATCH = 4


def _point_of(ctl: ControllerEnv, vm: str, job: str = "job1") -> str:
    """The bare id of the VM's newest point, as `restore-points list` shows it (name's last part)."""
    vm_id = str(ctl.vm(vm).manifest.id)
    return [p.name for p in ctl.points(job) if p.vm_id == vm_id][-1].rsplit("/", 1)[1]


def test_verify_and_export_after_a_session(ctl_raw: ControllerEnv) -> None:
    ctl = ctl_raw
    ctl.configure()
    assert ctl.run_job().state == api.SESSION_STATE_SUCCEEDED
    point = _point_of(ctl, "vm1")

    ok = ctl.cli("replica", "verify", "job1", "--vm", "vm1")
    assert "disk0: " in ok.stdout and "disk1: " in ok.stdout and " 0 mismatched" in ok.stdout, ok.stdout

    out = ctl.work / "vm1-disk0.raw"
    ctl.cli("restore-points", "export", "job1", point, "--vm", "vm1", "--disk", "disk0", "--output", str(out))
    assert qemu_identical(out, ctl.vm("vm1").image("disk0"))
    assert not out.with_name(out.name + ".partial").exists()
    full_name = f"jobs/job1/restorePoints/{point}"
    out1 = ctl.work / "vm1-disk1.raw"
    ctl.cli("restore-points", "export", "job1", full_name, "--vm", "vm1", "--disk", "disk1", "--output", str(out1))
    assert qemu_identical(out1, ctl.vm("vm1").image("disk1"))
    _vhdx_export(ctl, point, ctl.vm("vm1").image("disk0"))

    # A bit flipped in the replica on the target's disk, behind its digests' back: found at its offset.
    replica = ctl.replica("vm1", "disk0")
    with open(replica, "r+b") as f:
        f.seek(5 * MiB + 100)
        byte = f.read(1)
        f.seek(5 * MiB + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    bad = ctl.cli("replica", "verify", "job1", "--vm", "vm1", "--point", point, check=False)
    assert bad.returncode == EXIT_MISMATCH, bad.stdout + bad.stderr
    assert f"mismatch at offset {5 * MiB}" in bad.stdout and "1 mismatched" in bad.stdout
    report = json.loads(ctl.cli("replica", "verify", "job1", "--vm", "vm1", "--json", check=False).stdout)
    disk0 = next(d for d in report["disks"] if d["disk_id"] == "disk0")
    assert disk0["mismatches"] == [{"offset": 5 * MiB, "length": disk0["block_size"]}]
    sampled = json.loads(ctl.cli("replica", "verify", "job1", "--vm", "vm2", "--sample", "50", "--json").stdout)
    only = sampled["disks"][0]
    assert only["blocks_checked"] == only["blocks_total"] == 8 * MiB // only["block_size"] // 2


def _vhdx_export(ctl: ControllerEnv, point: str, source: object) -> None:
    """A VHDX export: qemu-img checks it and finds it identical to the source."""
    out = ctl.work / "vm1-disk0.vhdx"
    args = ["restore-points", "export", "job1", point, "--vm", "vm1", "--disk", "disk0", "--output", str(out)]
    done = ctl.cli(*args, "--format", "vhdx", check=False)
    assert done.returncode == 0, done.stderr
    need_tool("qemu-img")
    assert subprocess.run(["qemu-img", "check", "-q", "-f", "vhdx", str(out)], check=False).returncode == 0
    compare = ["qemu-img", "compare", "-q", "-f", "vhdx", "-F", "raw", str(out), str(source)]
    assert subprocess.run(compare, check=False).returncode == 0


def test_what_must_be_refused_is(ctl_raw: ControllerEnv) -> None:
    ctl = ctl_raw
    ctl.configure()
    ctl.configure(job="job2", vms=("vm2",))
    for job in ("job1", "job2"):
        assert ctl.run_job(job).state == api.SESSION_STATE_SUCCEEDED
    mine = _point_of(ctl, "vm1")
    _refused_names(ctl, mine, other=_point_of(ctl, "vm2", job="job2"))
    _refused_outputs(ctl, mine)
    _refused_callers(ctl, mine)


def _export(ctl: ControllerEnv, point: str, *more: str, vm: str = "vm1", disk: str = "disk0") -> Any:
    args = ["restore-points", "export", "job1", point, "--vm", vm, "--disk", disk, *more]
    return ctl.cli(*args, check=False)


def _refused_names(ctl: ControllerEnv, mine: str, *, other: str) -> None:
    out = ["--output", str(ctl.work / "x")]
    refused = _export(ctl, other, *out, vm="vm2")
    assert refused.returncode == 1 and "NOT_FOUND" in refused.stderr  # another job's point
    wrong_vm = _export(ctl, mine, *out, vm="vm2")
    assert wrong_vm.returncode == 1 and "INVALID_ARGUMENT" in wrong_vm.stderr
    for bad in ("../../etc/passwd", "jobs/job1/restorePoints/../x", "/etc"):
        r = _export(ctl, bad, *out)
        assert r.returncode == 1 and "INVALID_ARGUMENT" in r.stderr, r.stderr
    r = _export(ctl, mine, *out, disk="../disk0")
    assert r.returncode == 1 and "INVALID_ARGUMENT" in r.stderr
    assert not (ctl.work / "x").exists()


def _refused_outputs(ctl: ControllerEnv, mine: str) -> None:
    victim = ctl.work / "victim"
    victim.write_bytes(b"keep")
    link = ctl.work / "link.raw"
    link.symlink_to(victim)
    cases = [(link, "--force", "symbolic link"), (ctl.work, "--force", "directory"), (victim, "", "--force replaces")]
    for output, force, words in cases:
        r = _export(ctl, mine, "--output", str(output), *([force] if force else []))
        assert r.returncode == 1 and words in r.stderr, r.stderr
    assert victim.read_bytes() == b"keep" and link.is_symlink()


def _refused_callers(ctl: ControllerEnv, mine: str) -> None:
    reader = ctl.cli("--identity", "reader", "replica", "verify", "job1", "--vm", "vm1", check=False)
    assert reader.returncode == 1 and "PERMISSION_DENIED" in reader.stderr
    as_reader = ["--identity", "reader", "restore-points", "export", "job1", mine, "--vm", "vm1", "--disk", "disk0"]
    reader_export = ctl.cli(*as_reader, "--output", str(ctl.work / "r"), check=False)
    assert reader_export.returncode == 1 and "PERMISSION_DENIED" in reader_export.stderr
    assert ctl.cli("replica", "verify", "job1", "--vm", "vm1", "--sample", "1000", check=False).returncode == 2
    with pytest.raises(grpc.RpcError) as huge:
        list(ctl.client().VerifyJobReplica(api.VerifyJobReplicaRequest(job="jobs/job1", sample_percent=2**32 - 1)))
    assert huge.value.code() is grpc.StatusCode.INVALID_ARGUMENT

    # The target itself: a proxy's certificate reads no replica back, whatever it asks for.
    tls = tls_settings(ctl.certs, "proxy")
    target: Any = target_pb2_grpc.TargetAgentStub(grpc.secure_channel(ctl.target.address, channel_credentials(tls)))
    calls: list[Callable[[], Any]] = [
        lambda: list(target.VerifyReplica(target_pb2.VerifyReplicaRequest(replica_path="replicas/job1"))),
        lambda: list(target.ReadReplicaDisk(target_pb2.ReadReplicaDiskRequest(replica_path="replicas/job1"))),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as denied:
            call()
        assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED
