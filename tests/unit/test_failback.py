"""PrepareFailbackDisk: a failback disk is the original VM's disk (a hard link), its digests computed from it,
with a restore point standing for the original, so the session that writes it saves each original block
first. In process with the real servicer and the target's own session code: a transfer overwriting some
blocks is rolled back to the original byte for byte; a committed one leaves the original equal to the new
image; paths outside failback_roots, through links, and an original replaced under the disk are refused."""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import os
import time
from pathlib import Path

import grpc
import pytest
from pydantic import ValidationError

from target_agent import failback, replica, rollback, vm_replica
from target_agent.servicer import TargetAgentServicer
from tests.support.mounting import BS, Replica, changed, image
from tests.support.points import Aborted, FakeContext, servicer
from vmrepl.block import DIGEST_SIZE, digest, is_zero, zero_digest
from vmrepl.disk import fileio
from vmrepl.errors import FailedPrecondition, PathError
from vmrepl.names import check_replica_path
from vmrepl.v1 import common_pb2, target_pb2

FB_PATH = ".failback/job1/vm1"


def file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def block_digests(data: bytes) -> bytes:
    out = b""
    for at in range(0, len(data), BS):
        block = data[at : at + BS]
        out += zero_digest(len(block)) if is_zero(block) else digest(block)
    return out


@pytest.fixture
def env(tmp_path: Path) -> tuple[TargetAgentServicer, Path, bytes]:
    originals = tmp_path / "hyperv" / "vm1"
    originals.mkdir(parents=True)
    data = image(30, 11, tail=777)
    disk = originals / "disk0.raw"
    disk.write_bytes(data)
    s = servicer(tmp_path, failback_roots=[tmp_path / "hyperv"])
    return s, disk, data


def request(original: Path | str, **change: object) -> target_pb2.PrepareFailbackDiskRequest:
    out = target_pb2.PrepareFailbackDiskRequest(
        replica_path=FB_PATH,
        disk_id="disk0",
        original_path=str(original),
        format=common_pb2.DISK_FORMAT_RAW,
        block_size=BS,
    )
    for k, v in change.items():
        setattr(out, k, v)
    return out


async def prepare(s: TargetAgentServicer, original: Path | str, **change: object) -> target_pb2.ReplicaDisk:
    return await s.PrepareFailbackDisk(request(original, **change), FakeContext())  # type: ignore[arg-type]


async def refused(s: TargetAgentServicer, original: Path | str, **change: object) -> Aborted:
    with pytest.raises(Aborted) as e:
        await prepare(s, original, **change)
    return e.value


def failback_replica(s: TargetAgentServicer) -> Replica:
    return Replica(s.datastore.root, replica_path=FB_PATH)


async def test_a_failback_cut_short_is_rolled_back_to_the_original_byte_for_byte(
    env: tuple[TargetAgentServicer, Path, bytes],
) -> None:
    s, disk, data = env
    before = file_sha(disk)
    got = await prepare(s, disk)
    assert got.state == target_pb2.REPLICA_DISK_STATE_IDLE and got.disk_size == len(data)
    r = failback_replica(s)
    assert os.stat(r.disk_dir / "data.raw").st_ino == os.stat(disk).st_ino
    assert replica.read_digests(r.disk_dir, 0, 0)[1] == block_digests(data)
    assert (await prepare(s, disk)) == got  # idempotent
    # The failed-over VM's disk: only the blocks whose digests differ are sent, each original saved first.
    new = changed(data, 12, share=0.5)
    ours, theirs = block_digests(new), block_digests(data)
    differ = [i for i in range(len(ours) // DIGEST_SIZE) if ours[i * 16 : i * 16 + 16] != theirs[i * 16 : i * 16 + 16]]
    assert differ
    r.prepare("fb1", len(new))
    r.stream("fb1", new, base=data)
    pending = rollback.UndoFile(r.disk_dir / "rollback" / rollback.PENDING)
    assert sorted(pending.index) == differ
    pending.close()
    assert disk.read_bytes() == new
    vm_replica.roll_back(r.vm_dir, guards=r.guard)  # the failback failed after its transfer
    assert file_sha(disk) == before
    r.prepare("fb2", len(new))
    r.stream("fb2", new, base=data, stop_after=6)  # cut short midway
    assert file_sha(disk) != before
    vm_replica.roll_back(r.vm_dir, guards=r.guard)
    assert file_sha(disk) == before  # the original, byte for byte (its file: the VM's disk itself)


async def test_a_committed_failback_leaves_the_original_equal_to_the_new_image(
    env: tuple[TargetAgentServicer, Path, bytes],
) -> None:
    s, disk, data = env
    await prepare(s, disk)
    r = failback_replica(s)
    new = changed(data, 13, share=0.3)
    r.prepare("fb1", len(new))
    r.stream("fb1", new, base=data)
    r.commit("fb1")
    assert disk.read_bytes() == new
    assert replica.read_digests(r.disk_dir, 0, 0)[1] == block_digests(new)


async def test_an_original_replaced_under_the_failback_disk_is_refused(
    env: tuple[TargetAgentServicer, Path, bytes],
) -> None:
    s, disk, data = env
    await prepare(s, disk)
    r = failback_replica(s)
    r.prepare("fb1", len(data))
    r.stream("fb1", changed(data, 14), base=data)
    copy = disk.with_name("copy.raw")
    copy.write_bytes(disk.read_bytes())
    os.replace(copy, disk)  # the hypervisor (or someone) put another file at the original's path
    ctx = FakeContext()
    with pytest.raises(Aborted) as e:
        await s.GetReplicaDisk(target_pb2.GetReplicaDiskRequest(replica_path=FB_PATH, disk_id="disk0"), ctx)  # type: ignore[arg-type]
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "no longer the original" in e.value.details
    commit = target_pb2.CommitRestorePointRequest(
        replica_path=FB_PATH, session_id="fb1", checkpoint_id="cp-fb1", disk_ids=["disk0"]
    )
    with pytest.raises(Aborted) as e:
        await s.CommitRestorePoint(commit, ctx)  # type: ignore[arg-type]
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(FailedPrecondition):
        failback.check_originals(r.vm_dir)


async def test_original_paths_outside_the_roots_or_through_links_are_refused(
    env: tuple[TargetAgentServicer, Path, bytes], tmp_path: Path
) -> None:
    s, disk, _ = env
    outside = tmp_path / "outside.raw"
    outside.write_bytes(b"x" * BS)
    e = await refused(s, outside)
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT and "failback_roots: add the folder holding it" in e.details
    assert (await refused(s, "relative/disk0.raw")).code == grpc.StatusCode.INVALID_ARGUMENT
    assert (await refused(s, f"{disk.parent}/../vm1/disk0.raw")).code == grpc.StatusCode.INVALID_ARGUMENT
    linked_dir = tmp_path / "hyperv" / "linked"
    linked_dir.symlink_to(disk.parent)
    e = await refused(s, linked_dir / "disk0.raw")
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT and "symbolic link" in e.details
    (tmp_path / "hyperv" / "vm1" / "link.raw").symlink_to(outside)
    e = await refused(s, tmp_path / "hyperv" / "vm1" / "link.raw")
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT and "symbolic link" in e.details
    (tmp_path / "hyperv" / "vm1" / "folder.raw").mkdir()
    assert (await refused(s, tmp_path / "hyperv" / "vm1" / "folder.raw")).code == grpc.StatusCode.FAILED_PRECONDITION
    assert (await refused(s, disk, replica_path="../x")).code == grpc.StatusCode.INVALID_ARGUMENT
    assert (await refused(s, disk, replica_path=".other/x")).code == grpc.StatusCode.INVALID_ARGUMENT
    assert (await refused(s, disk, block_size=1000)).code == grpc.StatusCode.INVALID_ARGUMENT
    assert (await refused(s, disk, format=common_pb2.DISK_FORMAT_LAYER)).code == grpc.StatusCode.INVALID_ARGUMENT
    assert outside.read_bytes() == b"x" * BS
    assert not (s.datastore.root / ".failback").exists()
    bare = servicer(tmp_path / "bare")
    e = await refused(bare, disk)
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION and "set failback_roots to the folders" in e.details


async def test_an_original_named_by_its_hyperv_host_path_is_mapped_by_host_paths(
    env: tuple[TargetAgentServicer, Path, bytes], tmp_path: Path
) -> None:
    """A Hyper-V source provider names the original by the host's path: the target's host_paths mapping says
    where it has it; then the same checks as for a local path (inside failback_roots, no link, no '..')."""
    _, disk, data = env
    hyperv = tmp_path / "hyperv"
    s = servicer(tmp_path / "mapped", failback_roots=[hyperv], host_paths=[{"host_prefix": "C:\\VMs", "local": hyperv}])
    got = await prepare(s, "c:\\vms\\vm1\\disk0.raw")  # the prefix compares case-insensitively
    assert got.disk_size == len(data)
    linked = failback_replica(s).disk_dir / "data.raw"
    assert os.stat(linked).st_ino == os.stat(disk).st_ino, "the data file is a hard link of the mapped original"
    e = await refused(s, "D:\\VMs\\vm1\\disk0.raw")
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION and "host_paths" in e.details, e.details
    assert (await refused(s, "C:\\VMs\\..\\outside.raw")).code == grpc.StatusCode.INVALID_ARGUMENT
    (hyperv / "linked").symlink_to(disk.parent)
    e = await refused(s, "C:\\VMs\\linked\\disk0.raw")
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT and "symbolic link" in e.details
    elsewhere = servicer(
        tmp_path / "elsewhere",
        failback_roots=[tmp_path / "other"],
        host_paths=[{"host_prefix": "C:\\VMs", "local": hyperv}],
    )
    e = await refused(elsewhere, "C:\\VMs\\vm1\\disk0.raw")  # mapped, but outside the failback roots
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT and "failback_roots" in e.details
    for bad in (
        [{"host_prefix": "C:\\VMs", "local": hyperv}, {"host_prefix": "c:\\vms\\", "local": tmp_path}],
        [{"host_prefix": "VMs", "local": hyperv}],
        [{"host_prefix": "C:\\VMs", "local": "relative"}],
    ):
        with pytest.raises(ValidationError):
            servicer(tmp_path / "bad", failback_roots=[hyperv], host_paths=bad)


async def test_a_replica_is_never_made_a_failback_disk(env: tuple[TargetAgentServicer, Path, bytes]) -> None:
    s, disk, data = env
    job = Replica(s.datastore.root, replica_path="jobs/vm1")
    job.session("s1", data)
    e = await refused(s, disk, replica_path="jobs/vm1")
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION and "holds a replica" in e.details
    await prepare(s, disk)
    other = disk.with_name("disk1.raw")
    other.write_bytes(data)
    e = await refused(s, other)  # the same disk id for another original
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION
    r = failback_replica(s)
    r.prepare("fb1", len(data))
    e = await refused(s, other, disk_id="disk1")  # a disk added once the session began
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION and "prepare every failback disk" in e.details


async def test_every_disk_of_the_vm_is_in_the_original_point(env: tuple[TargetAgentServicer, Path, bytes]) -> None:
    s, disk, data = env
    second = disk.with_name("disk1.raw")
    second.write_bytes(image(8, 3))
    await prepare(s, disk)
    await prepare(s, second, disk_id="disk1")
    listed = await s.ListRestorePoints(
        target_pb2.ListRestorePointsRequest(replica_path=FB_PATH),
        FakeContext(),  # type: ignore[arg-type]
    )
    assert len(listed.restore_points) == 1
    assert sorted(d.disk_id for d in listed.restore_points[0].disks) == ["disk0", "disk1"]
    assert listed.restore_points[0].restorable
    del data


def test_only_failback_folders_may_start_with_a_dot() -> None:
    assert check_replica_path("replica_path", ".failback/job1/vm1") == [".failback", "job1", "vm1"]
    assert check_replica_path("replica_path", "jobs/vm1") == ["jobs", "vm1"]
    for bad in (".failback", ".failback/", ".failback/../x", ".mounts/x", ".trash/x", "a/.failback/x", "./x"):
        with pytest.raises(PathError):
            check_replica_path("replica_path", bad)


async def test_an_original_hard_linked_to_another_file_is_refused(
    env: tuple[TargetAgentServicer, Path, bytes], tmp_path: Path
) -> None:
    # Whoever may write the original VM's folder plants, as the original, a hard link of a file the target
    # must not write (another VM's replica, say: it is on the same file system). The failback would write it.
    s, disk, _ = env
    victim = s.datastore.root / "victim.raw"
    victim.write_bytes(b"v" * (3 * BS))
    planted = disk.with_name("disk1.raw")
    os.link(victim, planted)
    e = await refused(s, planted, disk_id="disk1")
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION and "hard link" in e.details
    assert not (s.datastore.root / FB_PATH / "disks" / "disk1").exists()
    assert victim.read_bytes() == b"v" * (3 * BS)
    got = await prepare(s, disk)  # the original itself (a single link) is readied, and again once linked
    assert (await prepare(s, disk)) == got and os.stat(disk).st_nlink == 2


async def test_a_folder_swapped_for_a_link_after_the_path_check_is_not_followed(
    env: tuple[TargetAgentServicer, Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    # PrepareFailbackDisk checks the path, then readies the disk in a worker thread: whoever may write the
    # roots swaps the VM's folder for a link to a folder holding a file the target must not write meanwhile.
    s, disk, _ = env
    victim_dir = s.datastore.root / "jobs" / "vm9"
    victim_dir.mkdir(parents=True)
    victim = victim_dir / "disk0.raw"
    victim.write_bytes(b"v" * (3 * BS))
    original = failback.check_original_path(s.failback_roots, str(disk))
    disk.parent.rename(disk.parent.with_name("moved"))
    disk.parent.symlink_to(victim_dir)
    vm_dir = s.datastore.vm_dir(FB_PATH)
    disk_dir = s.datastore.disk_dir(FB_PATH, "disk0")
    with pytest.raises(FailedPrecondition, match="symbolic link"):
        failback.prepare(
            vm_dir, disk_dir, guards=s.receiver.guard, original=original, replica_format="raw", block_size=BS
        )
    assert os.stat(victim).st_nlink == 1 and victim.read_bytes() == b"v" * (3 * BS)
    assert not (disk_dir / "data.raw").exists()
    # The same swap at the very moment of the link.
    disk.parent.unlink()
    disk.parent.with_name("moved").rename(disk.parent)
    real_link = fileio.link

    def swap_then_link(src: Path, dst: Path) -> None:
        disk.parent.rename(disk.parent.with_name("moved"))
        disk.parent.symlink_to(victim_dir)
        real_link(src, dst)

    monkeypatch.setattr(failback, "link", swap_then_link)
    with pytest.raises(FailedPrecondition, match="changed while it was linked"):
        failback.prepare(
            vm_dir, disk_dir, guards=s.receiver.guard, original=original, replica_format="raw", block_size=BS
        )
    assert os.stat(victim).st_nlink == 1 and victim.read_bytes() == b"v" * (3 * BS)
    assert not (disk_dir / "data.raw").exists()


async def test_an_original_in_the_targets_own_folders_is_refused(tmp_path: Path) -> None:
    # failback_roots set to a folder holding the datastore too (both must be on one file system): a failback
    # must never write a replica's data file as if it were a VM's disk.
    s = servicer(tmp_path, failback_roots=[tmp_path])
    job = Replica(s.datastore.root, replica_path="jobs/vm1")
    data = image(8, 4)
    job.session("s1", data)
    victim = job.disk_dir / "data.raw"
    assert os.stat(victim).st_nlink == 1
    e = await refused(s, victim)
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT and "datastore" in e.details
    assert victim.read_bytes() == data and not (s.datastore.root / ".failback").exists()


async def _delete(s: TargetAgentServicer, replica_path: str) -> bool:
    request = target_pb2.DeleteReplicaRequest(replica_path=replica_path)
    return (await s.DeleteReplica(request, FakeContext())).deleted  # type: ignore[arg-type]


async def test_the_job_folder_goes_with_its_last_vms_failback_folder(
    env: tuple[TargetAgentServicer, Path, bytes],
) -> None:
    s, disk, _ = env
    other = disk.parent / "disk1.raw"
    other.write_bytes(image(30, 12))
    await prepare(s, disk)
    await prepare(s, other, replica_path=".failback/job1/vm2")
    job_dir = s.datastore.root / ".failback" / "job1"
    assert await _delete(s, FB_PATH)
    assert sorted(p.name for p in job_dir.iterdir()) == ["vm2"]  # another VM's failback: the folder stays
    assert await _delete(s, ".failback/job1/vm2")
    assert not job_dir.exists() and (s.datastore.root / ".failback").is_dir()
    assert disk.exists() and other.exists()  # the originals: never removed with their failback folders
    # A deletion cut short after its rename left the job folder empty: deleting again removes it.
    job_dir.mkdir()
    assert not await _delete(s, FB_PATH) and not job_dir.exists()
    # A replica outside .failback/ keeps its parent folder (a job's replica root) even when empty.
    (s.datastore.root / "jobs" / "j").mkdir(parents=True)
    assert not await _delete(s, "jobs/j/vm1") and (s.datastore.root / "jobs" / "j").is_dir()


async def test_a_job_folder_is_never_removed_while_a_prepare_makes_a_vms_folder_in_it(
    env: tuple[TargetAgentServicer, Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The window the lock closes: a prepare has made `.failback/job1/` but not yet `vm1/` in it when another
    VM's DeleteReplica finds the job folder empty; the removal waits for the prepare (without the lock it
    removes the folder and the prepare's mkdir of `vm1/` fails)."""
    s, disk, _ = env
    job_dir = s.datastore.root / ".failback" / "job1"
    real = fileio.make_dirs
    loop = asyncio.get_running_loop()
    removal: list[concurrent.futures.Future[bool]] = []

    def make_dirs_slowly(path: Path) -> None:
        if path.parent != job_dir or removal:
            return real(path)
        job_dir.mkdir(parents=True, exist_ok=True)  # the parent made, the VM's folder not yet
        removal.append(asyncio.run_coroutine_threadsafe(_delete(s, ".failback/job1/vm9"), loop))
        time.sleep(0.3)  # the removal runs meanwhile, in its own thread
        os.mkdir(path)

    monkeypatch.setattr(failback, "make_dirs", make_dirs_slowly)
    await prepare(s, disk)
    assert removal and not await asyncio.wrap_future(removal[0])
    assert (job_dir / "vm1" / failback.FAILBACK_FILE).is_file()
