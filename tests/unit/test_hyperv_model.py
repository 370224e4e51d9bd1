"""The Hyper-V host model (tests/support/hyperv): checkpoints freeze real VHDX disks behind AVHDX children
that vmrepl's reader follows, merges are byte-exact against a flat reference, RCT ranges, WMI jobs, faults,
and the script handlers' output read back with `read_envelope`."""

from __future__ import annotations

import base64
import json
import random
import subprocess
from pathlib import Path

import pytest
from dissect.hypervisor.disk.vhdx import VHDX

from tests.support.clock import Clock
from tests.support.hyperv import faults, handlers
from tests.support.hyperv.model import HyperVHost, JobPolicy, parse_rct_id
from tests.support.hyperv.state import windows_to_local
from tests.support.wsman import ScriptResult
from vmrepl.disk.vhdx import VhdxReader
from vmrepl.errors import HostError
from vmrepl.extent import MiB
from vmrepl.providers.hyperv import models as m
from vmrepl.providers.hyperv.envelope import read_envelope
from vmrepl.providers.hyperv.scripts import SCRIPTS

DIR = "C:\\Hyper-V\\Virtual Hard Disks"
SIZES = (16 * MiB, 8 * MiB)


def same(got: bytes, want: bytes) -> None:
    """Byte-exact, reporting the first differing offset (not a diff of megabytes)."""
    if got != want:
        at = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want)))
        pytest.fail(f"differs at byte {at} (lengths {len(got)} and {len(want)})")


class Guest:
    """A VM on the model and the flat images its disks must read as."""

    def __init__(self, host: HyperVHost, name: str = "wéb01 测试") -> None:
        self.host = host
        self.vm = host.add_vm(name, disks=[(f"{DIR}\\{name}-{i}.vhdx", s) for i, s in enumerate(SIZES)])
        self.flat = [bytearray(s) for s in SIZES]
        self.rng = random.Random(7)

    def write(self, disk: int, offset: int, length: int) -> None:
        data = self.rng.randbytes(length)
        self.host.write(self.vm.id, disk, offset, data)
        self.flat[disk][offset : offset + length] = data

    def check(self) -> None:
        for i in range(len(SIZES)):
            same(self.host.read(self.vm.id, i), bytes(self.flat[i]))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def host(tmp_path: Path, clock: Clock) -> HyperVHost:
    # Fake time: the scripts' job loop "sleeps" by moving the clock on, so timeouts cost no real time.
    h = HyperVHost(tmp_path / "host", poll_interval=0.1, monotonic=clock.seconds, sleep=clock.advance)
    h.job_policy = JobPolicy(asynchronous=False)
    return h


def local_files(host: HyperVHost) -> list[str]:
    return sorted(p.name for p in (host.drives / "C" / "Hyper-V" / "Virtual Hard Disks").iterdir())


def test_windows_paths_map_case_insensitively_and_refuse_escapes(tmp_path: Path) -> None:
    drives = tmp_path / "drives"
    (drives / "C" / "Hyper-V").mkdir(parents=True)
    assert windows_to_local(drives, "c:\\HYPER-V\\a.vhdx") == drives / "C" / "Hyper-V" / "a.vhdx"
    for bad in ("C:\\a\\..\\b", "\\\\srv\\share\\a", "a\\b", "C:\\a\\\\b", "C:\\.\\a", "C:/a", "\\\\?\\C:\\a"):
        with pytest.raises(ValueError):
            windows_to_local(drives, bad)


def test_checkpoint_freezes_disks_and_chain_reads_through_vmrepl_reader(host: HyperVHost) -> None:
    g = Guest(host)
    g.write(0, 0, MiB)
    g.write(1, 4096, 8192)
    frozen = [bytes(f) for f in g.flat]
    first = host.snapshot(host.create_snapshot(g.vm.id, name="vmrepl-a").out or "")
    assert first is not None and [d.path for d in first.disks] == [d.chain[0] for d in host.vm(g.vm.id).disks]
    g.write(0, 512, 1024)  # into the AVHDX: a partially present block
    g.write(0, 8 * MiB, 8 * MiB)  # a whole block: fully present
    mid = [bytes(f) for f in g.flat]
    second = host.snapshot(host.create_snapshot(g.vm.id, name="vmrepl-b").out or "")
    assert second is not None
    g.write(1, 0, 512)
    g.check()
    current = host.local(host.vm(g.vm.id).disks[0].chain[-1])
    theirs = VHDX(current)  # an independent reader (dissect.hypervisor) follows the same chain
    theirs.seek(0)
    same(theirs.read(SIZES[0]), bytes(g.flat[0]))
    for i, d in enumerate(first.disks):
        same(host.read_file(d.path, 0, SIZES[i]), frozen[i])  # untouched since the first freeze
    disk0 = host.vm(g.vm.id).disks[0]
    assert len(disk0.chain) == 3 and disk0.chain[1].endswith(".avhdx") and second.disks[0].path == disk0.chain[1]
    assert disk0.chain[1].rpartition("\\")[2].startswith(f"{g.vm.name}-0_")
    with VhdxReader(host.local(second.disks[0].path), roots=[host.drives]) as r:
        assert [p.name for p in r.chain] == [host.local(p).name for p in reversed(disk0.chain[:2])]
        buf = bytearray(SIZES[0])
        r.read_into(memoryview(buf), 0)
        same(bytes(buf), mid[0])


def test_merges_are_byte_exact_against_flat_reference(host: HyperVHost) -> None:
    g = Guest(host)
    g.write(0, 0, 2 * MiB)
    a = host.create_snapshot(g.vm.id, name="vmrepl-a").out or ""
    g.write(0, 1024, 4096)
    b = host.create_snapshot(g.vm.id, name="vmrepl-b").out or ""
    g.write(0, 9 * MiB, MiB + 512)
    g.write(1, 0, 8 * MiB)
    b_view = host.read_file(host.snapshot(b).disks[0].path, 0, SIZES[0])  # type: ignore[union-attr]

    assert host.destroy_snapshot(a).return_value == 0  # the older one: its child merges into the base
    g.check()
    snap_b = host.snapshot(b)
    assert snap_b is not None and snap_b.disks[0].path == host.vm(g.vm.id).disks[0].chain[0]
    same(host.read_file(snap_b.disks[0].path, 0, SIZES[0]), b_view)
    assert host.destroy_snapshot(b).return_value == 0
    g.check()
    assert [len(d.chain) for d in host.vm(g.vm.id).disks] == [1, 1]
    assert local_files(host) == sorted(f"{g.vm.name}-{i}.vhdx" for i in range(2))  # AVHDX files deleted
    for d in host.vm(g.vm.id).disks:  # qemu-img still finds the merged base disks sound
        subprocess.run(
            ["qemu-img", "check", "-f", "vhdx", str(host.local(d.chain[0]))], check=True, capture_output=True
        )
    assert HyperVHost(host.root).state == host.state  # persisted in host.json


def test_removing_the_oldest_of_three_checkpoints_keeps_every_later_view_readable(host: HyperVHost) -> None:
    """The oldest checkpoint's child merges into the base and its own child is re-linked to the base: the
    re-linked file's data is unchanged, so its DataWriteGuid (what its own child links to) must stay."""
    g = Guest(host)
    g.write(0, 0, MiB)
    a = host.create_snapshot(g.vm.id, name="vmrepl-a").out or ""
    g.write(0, MiB, 4096)
    b = host.create_snapshot(g.vm.id, name="vmrepl-b").out or ""
    g.write(0, 2 * MiB, 4096)
    c = host.create_snapshot(g.vm.id, name="vmrepl-c").out or ""
    g.write(0, 3 * MiB, 4096)
    views = {s: host.read_file(host.snapshot(s).disks[0].path, 0, SIZES[0]) for s in (b, c)}  # type: ignore[union-attr]

    assert host.destroy_snapshot(a).return_value == 0
    g.check()  # the VM's own view, through the whole re-linked chain
    for s, view in views.items():
        same(host.read_file(host.snapshot(s).disks[0].path, 0, SIZES[0]), view)  # type: ignore[union-attr]


def rct_for(host: HyperVHost, rp: m.ReferencePoint | object, disk_instance: str) -> str:
    assert isinstance(rp, m.ReferencePoint)
    return rp.rct_ids[rp.disk_ids.index(disk_instance)]


def test_rct_ranges_since_reference_point_paired_by_disk_id(host: HyperVHost) -> None:
    g = Guest(host)
    g.write(0, 0, MiB)
    s1 = host.create_snapshot(g.vm.id, name="vmrepl-1").out or ""
    g.write(0, 3 * MiB, 4096)  # after the freeze: belongs to the next point
    rp_id = host.convert_to_reference_point(s1).out or ""
    rp = handlers._rp_result(host.reference_point(rp_id))
    ids = [d.instance_id for d in host.vm(g.vm.id).disks]
    assert rp.disk_ids == list(reversed(ids)) and rp.type == 2  # never in enumeration order
    assert all(parse_rct_id(r) is not None for r in rp.rct_ids)
    assert host.snapshot(s1) is None and [len(d.chain) for d in host.vm(g.vm.id).disks] == [1, 1]
    g.check()
    for offset in range(4 * MiB, 4 * MiB + 6 * 8192, 8192):  # six separate ranges
        g.write(0, offset, 512)
    s2 = host.snapshot(host.create_snapshot(g.vm.id, name="vmrepl-2").out or "")
    assert s2 is not None
    g.write(0, 12 * MiB, 512)  # after the second freeze: not in its changes
    path, limit = s2.disks[0].path, rct_for(host, rp, ids[0])
    r = host.get_virtual_disk_changes(path, limit, 0, SIZES[0])
    assert r.return_value == 0 and r.processed == SIZES[0]
    assert [(e.offset, e.length) for e in r.ranges] == [(3 * MiB, 4096)] + [(4 * MiB + k * 8192, 512) for k in range(6)]
    clipped = host.get_virtual_disk_changes(path, limit, 3 * MiB + 1024, MiB)
    assert next((e.offset, e.length) for e in clipped.ranges) == (3 * MiB + 1024, 3072)
    assert host.get_virtual_disk_changes(s2.disks[1].path, rct_for(host, rp, ids[1]), 0, SIZES[1]).ranges == []
    host.ranges_per_call = 4  # the internal buffer: ProcessedByteLength stops at the 4th range
    part = host.get_virtual_disk_changes(path, limit, 0, SIZES[0])
    assert len(part.ranges) == 4 and part.processed == 4 * MiB + 2 * 8192 + 512
    # the wrong disk's id (position pairing), garbage, the wrong file: refused
    assert host.get_virtual_disk_changes(path, rct_for(host, rp, ids[1]), 0, SIZES[0]).return_value == 32768
    assert host.get_virtual_disk_changes(path, "rctX:nonsense", 0, SIZES[0]).return_value == 32768
    assert host.get_virtual_disk_changes("C:\\nowhere.vhdx", limit, 0, SIZES[0]).return_value == 32779
    assert host.get_virtual_disk_changes(path, limit, 8 * MiB, SIZES[0]).return_value == 32773


def test_disk_changes_script_loops_stalls_and_stops_at_max_ranges(host: HyperVHost) -> None:
    g = Guest(host)
    rp_id = host.convert_to_reference_point(host.create_snapshot(g.vm.id, name="vmrepl-1").out or "").out or ""
    rp = handlers._rp_result(host.reference_point(rp_id))
    for k in range(10):
        g.write(0, k * MiB, 512)
    s2 = host.snapshot(host.create_snapshot(g.vm.id, name="vmrepl-2").out or "")
    assert s2 is not None
    limit = rct_for(host, rp, host.vm(g.vm.id).disks[0].instance_id)
    host.ranges_per_call = 3

    def changes(**kw: int) -> m.DiskChanges:
        p = {"offset": 0, "length": SIZES[0], "chunk": 4 * MiB, "max_ranges": 100, "timeout_seconds": 5} | kw
        out = run(host, "disk_changes", {"path": s2.disks[0].path, "limit_id": limit, **p})
        return read_envelope(out.stdout, m.DiskChanges)  # type: ignore[no-any-return]

    full = changes()
    assert [r.offset for r in full.ranges] == [k * MiB for k in range(10)] and full.processed == SIZES[0]
    assert not full.stalled and host.calls.count("GetVirtualDiskChanges") > 4  # chunks and partial buffers
    early = changes(max_ranges=4)
    assert len(early.ranges) >= 4 and early.processed < SIZES[0]
    host.add_fault(faults.Stall())
    stalled = changes()
    assert stalled.stalled and stalled.processed == 0 and stalled.ranges == []


def test_vanished_reference_point_and_rct_disabled(host: HyperVHost) -> None:
    g = Guest(host)
    rp_id = host.convert_to_reference_point(host.create_snapshot(g.vm.id, name="vmrepl-1").out or "").out or ""
    rp = handlers._rp_result(host.reference_point(rp_id))
    g.write(0, 0, 512)
    s2 = host.snapshot(host.create_snapshot(g.vm.id, name="vmrepl-2").out or "")
    assert s2 is not None
    limit = rct_for(host, rp, host.vm(g.vm.id).disks[0].instance_id)
    host.vanish_reference_point(rp_id)
    assert host.reference_point(rp_id) is None
    assert host.get_virtual_disk_changes(s2.disks[0].path, limit, 0, MiB).return_value == 32768
    host.set_rct_enabled(g.vm.id, False)
    assert host.get_virtual_disk_changes(s2.disks[0].path, limit, 0, MiB).return_value == 32770
    rp2 = host.reference_point(host.convert_to_reference_point(s2.id).out or "")
    assert rp2 is not None and rp2.rct_ids == [] and len(rp2.disk_ids) == 2


def test_jobs_async_sync_and_faults(host: HyperVHost, clock: Clock) -> None:
    g = Guest(host)
    host.job_policy = JobPolicy(asynchronous=True, polls=3)
    started = host.create_snapshot(g.vm.id, name="vmrepl-1")
    assert started.return_value == 4096 and started.job and host.state.snapshots == []  # not done yet
    states = [host.poll_job(started.job).state for _ in range(3)]
    assert states == [4, 4, 7] and host.poll_job(started.job).result == host.state.snapshots[0].id
    host.job_policy = JobPolicy(asynchronous=False)
    host.add_fault(faults.access_denied("DestroySnapshot"))
    host.add_fault(faults.vm_busy("DestroySnapshot", 32774))
    sid = host.state.snapshots[0].id
    assert [host.destroy_snapshot(sid).return_value for _ in range(3)] == [32769, 32774, 0]
    host.add_fault(faults.JobFails("CreateSnapshot", error_code=32775, description="VM is busy."))
    failed = host.create_snapshot(g.vm.id, name="vmrepl-2")
    views = [host.poll_job(failed.job or "") for _ in range(2)]
    assert [v.state for v in views] == [4, 10] and views[1].error_code == 32775 and host.state.snapshots == []
    host.add_fault(faults.JobHangs("CreateSnapshot"))
    hung = host.create_snapshot(g.vm.id, name="vmrepl-3")
    assert {host.poll_job(hung.job or "").state for _ in range(5)} == {4} and host.state.snapshots == []
    host.add_fault(faults.SlowJob("CreateSnapshot", seconds=0.5))
    slow = host.create_snapshot(g.vm.id, name="vmrepl-4")
    assert [host.poll_job(slow.job or "").state for _ in range(5)] == [4] * 5  # the fake clock has not moved
    clock.advance(0.5)
    assert host.poll_job(slow.job or "").state == 7 and host.state.snapshots[-1].name == "vmrepl-4"


def run(host: HyperVHost, name: str, params: dict[str, object]) -> ScriptResult:
    env = {"VMREPL_PARAMS": base64.b64encode(json.dumps(params).encode()).decode()}
    return handlers.run(host, name, env)


def test_every_script_answer_validates_with_read_envelope(host: HyperVHost) -> None:
    host.job_policy = JobPolicy(asynchronous=True, polls=2)
    g = Guest(host)
    vid = g.vm.id.lower()
    cp = {"vm_id": vid, "name": "vmrepl-x", "consistency_level": 1, "guest_backup_type": 2, "timeout_seconds": 5}
    snap = read_envelope(run(host, "create_checkpoint", cp).stdout, m.Snapshot)
    g.write(0, 0, 4096)
    second = read_envelope(run(host, "create_checkpoint", cp).stdout, m.Snapshot)
    rp = read_envelope(
        run(host, "convert_checkpoint", {"vm_id": vid, "snapshot_id": snap.id, "timeout_seconds": 5}).stdout,
        m.ReferencePoint,
    )
    # the merge moved the second checkpoint's frozen file to the base disk: a listing shows where it is now
    listed = read_envelope(run(host, "list_checkpoints", {"vm": vid}).stdout, SCRIPTS["list_checkpoints"].result)
    assert [s.id for s in listed] == [second.id] and listed[0].disks[0].path != second.disks[0].path
    dc = {"path": listed[0].disks[0].path, "limit_id": rct_for(host, rp, g.vm.disks[0].instance_id), "offset": 0}
    calls: dict[str, dict[str, object]] = {
        "host_info": {},
        "list_vms": {},
        "get_vm": {"vm": g.vm.name},
        "list_checkpoints": {"vm": vid},
        "list_reference_points": {"vm": vid},
        "disk_changes": dc | {"length": SIZES[0], "chunk": MiB, "max_ranges": 10, "timeout_seconds": 5},
        "remove_checkpoint": {"vm_id": vid, "snapshot_id": second.id, "timeout_seconds": 5},
        "destroy_reference_point": {"vm_id": vid, "reference_point_id": rp.id, "timeout_seconds": 5},
    }
    results: dict[str, object] = {}
    for name, params in calls.items():
        out = run(host, name, params)
        assert out.exit_code == 0 and out.stdout.endswith(b"}\r\n") and out.stdout.count(b"\n") == 1
        results[name] = read_envelope(out.stdout, SCRIPTS[name].result)
    assert results["get_vm"][0].name == "wéb01 测试"  # type: ignore[index]
    assert read_envelope(run(host, "get_vm", {"vm": "WÉB01 测试"}).stdout, SCRIPTS["get_vm"].result)[0].id == vid
    assert "测试".encode() in run(host, "list_vms", {}).stdout  # UTF-8, not \u escapes
    assert run(host, "host_info", {}).stderr.startswith(b"#< CLIXML\r\n")  # progress noise with rc 0
    assert results["disk_changes"] == m.DiskChanges(
        processed=SIZES[0], ranges=[m.ChangedRange(offset=0, length=4096)], stalled=False
    )
    assert results["remove_checkpoint"] == m.Removed(removed=True)
    assert results["destroy_reference_point"] == m.Removed(removed=True)
    again = run(host, "destroy_reference_point", calls["destroy_reference_point"])
    assert read_envelope(again.stdout, m.Removed) == m.Removed(removed=False)
    assert read_envelope(run(host, "get_vm", {"vm": "nobody"}).stdout, SCRIPTS["get_vm"].result) == []
    # The failover scripts are answered through the provider in tests/unit/test_hyperv_failover.py.
    failover = {"register_vm", "unregister_vm", "change_vm_state", "shutdown_vm", "vm_power", "merge_vm_disks"}
    assert set(calls) | {"create_checkpoint", "convert_checkpoint"} | failover == set(SCRIPTS)


def expect_error(out: ScriptResult, result: object) -> HostError:
    assert out.exit_code == 1
    with pytest.raises(HostError) as raised:
        read_envelope(out.stdout, result)
    return raised.value


def test_script_error_envelopes(host: HyperVHost, clock: Clock) -> None:
    g = Guest(host)
    vid = g.vm.id
    cp = {"vm_id": vid, "name": "vmrepl-x", "consistency_level": 2, "guest_backup_type": 2, "timeout_seconds": 1}
    host.add_fault(faults.access_denied("CreateSnapshot"))
    e = expect_error(run(host, "create_checkpoint", cp), m.Snapshot)
    assert (e.operation, e.code) == ("Msvm_VirtualSystemSnapshotService.CreateSnapshot", 32769)
    host.add_fault(faults.JobFails("CreateSnapshot", error_code=32768, description="Guest VSS failed."))
    e = expect_error(run(host, "create_checkpoint", cp), m.Snapshot)
    assert (e.operation, e.code) == ("Msvm_ConcreteJob", 32768) and "Guest VSS failed." in str(e)
    host.add_fault(faults.JobHangs("CreateSnapshot"))
    e = expect_error(run(host, "create_checkpoint", cp), m.Snapshot)
    assert (e.operation, e.code) == ("Msvm_ConcreteJob", None) and "within 1 seconds" in str(e)
    e = expect_error(
        run(host, "list_checkpoints", {"vm": "9D2E0000-0000-0000-0000-000000000000"}),
        SCRIPTS["list_checkpoints"].result,
    )
    assert e.code is None
    host.add_fault(faults.SlowJob("CreateSnapshot", seconds=3.0))  # the script gives up; the host carries on
    e = expect_error(run(host, "create_checkpoint", cp), m.Snapshot)
    assert e.code is None and "within 1 seconds" in str(e) and host.state.snapshots == []
    clock.advance(2.1)  # past the job's 3 s (the script gave up at 1 s)
    listed = read_envelope(run(host, "list_checkpoints", {"vm": vid}).stdout, SCRIPTS["list_checkpoints"].result)
    assert [s.name for s in listed] == ["vmrepl-x"]  # a stale recovery checkpoint, for the next run to clean
    e = expect_error(handlers.run(host, "host_info", {"VMREPL_PARAMS": "not base64!"}), m.HostInfo)
    assert e.operation == "ConvertFrom-Json"
    e = expect_error(run(host, "get_vm", {"vm": ""}), SCRIPTS["get_vm"].result)  # fails the params model
    host.set_host(os_build=9600)
    assert read_envelope(run(host, "host_info", {}).stdout, m.HostInfo).os_build == 9600
    e = expect_error(run(host, "create_checkpoint", cp), m.Snapshot)
    assert "2016" in str(e)
