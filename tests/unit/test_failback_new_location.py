"""PrepareFailbackDisk with `create` (a failback to a new location): a new, empty image made in a new VM folder
under failback_roots, its digests the zero block's, written by an ordinary session; DeleteReplica with
remove_created removes exactly the images it made (and their folder once empty), never another file. In
process with the real servicer and the target's own session code."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest

from target_agent import failback, replica, vm_replica
from target_agent.servicer import TargetAgentServicer
from tests.support.mounting import BS, Replica, changed, image
from tests.support.points import Aborted, FakeContext, servicer
from vmrepl.block import zero_digest
from vmrepl.errors import PathError
from vmrepl.v1 import common_pb2, target_pb2

FB_PATH = ".failback/job1/vm1"
SIZE = 30 * BS + 777


@pytest.fixture
def env(tmp_path: Path) -> tuple[TargetAgentServicer, Path]:
    root = tmp_path / "filehost"
    root.mkdir()
    return servicer(tmp_path, failback_roots=[root]), root


def request(path: Path | str, **change: object) -> target_pb2.PrepareFailbackDiskRequest:
    out = target_pb2.PrepareFailbackDiskRequest(
        replica_path=FB_PATH,
        disk_id="disk0",
        original_path=str(path),
        format=common_pb2.DISK_FORMAT_RAW,
        block_size=BS,
        create=True,
        size=SIZE,
    )
    for k, v in change.items():
        setattr(out, k, v)
    return out


async def prepare(s: TargetAgentServicer, path: Path | str, **change: object) -> target_pb2.ReplicaDisk:
    return await s.PrepareFailbackDisk(request(path, **change), FakeContext())  # type: ignore[arg-type]


async def refused(s: TargetAgentServicer, path: Path | str, **change: object) -> Aborted:
    with pytest.raises(Aborted) as e:
        await prepare(s, path, **change)
    return e.value


async def delete(s: TargetAgentServicer, *, remove_created: bool) -> bool:
    ask = target_pb2.DeleteReplicaRequest(replica_path=FB_PATH, remove_created=remove_created)
    return (await s.DeleteReplica(ask, FakeContext())).deleted  # type: ignore[arg-type]


def fb(s: TargetAgentServicer) -> Replica:
    return Replica(s.datastore.root, replica_path=FB_PATH)


async def test_a_new_image_is_made_empty_written_by_a_session_and_kept_by_a_plain_delete(
    env: tuple[TargetAgentServicer, Path],
) -> None:
    s, root = env
    new = root / "web01-fb" / "disk0.raw"
    got = await prepare(s, new)
    assert got.state == target_pb2.REPLICA_DISK_STATE_IDLE and got.disk_size == SIZE
    assert new.stat().st_size == SIZE and new.read_bytes() == bytes(SIZE)
    r = fb(s)
    assert os.stat(r.disk_dir / "data.raw").st_ino == new.stat().st_ino
    blocks = -(-SIZE // BS)
    want = b"".join(zero_digest(min(BS, SIZE - b * BS)) for b in range(blocks))
    assert replica.read_digests(r.disk_dir, 0, 0)[1] == want  # every non-zero block differs from them
    assert (await prepare(s, new)) == got  # idempotent
    data = image(30, 21, tail=777)
    r.prepare("fb1", SIZE)
    r.stream("fb1", data, base=bytes(SIZE))
    r.commit("fb1")
    assert new.read_bytes() == data
    assert await delete(s, remove_created=False)
    assert new.read_bytes() == data  # commit: the new VM's disk stays


async def test_remove_created_removes_only_the_images_it_made_and_their_empty_folder(
    env: tuple[TargetAgentServicer, Path],
) -> None:
    s, root = env
    folder = root / "web01-fb"
    await prepare(s, folder / "disk0.raw")
    await prepare(s, folder / "disk1.raw", disk_id="disk1", size=4 * BS)
    r = fb(s)
    r.prepare("fb1", SIZE)
    r.stream("fb1", changed(bytes(SIZE), 3), base=bytes(SIZE), stop_after=4)  # cut short
    vm_replica.roll_back(r.vm_dir, guards=r.guard)
    other = folder / "disk1.raw"
    os.replace(other, folder / "moved")  # disk1 replaced by another file at its path: left alone
    other.write_bytes(b"someone else's")
    assert await delete(s, remove_created=True)
    assert not (folder / "disk0.raw").exists()
    assert other.read_bytes() == b"someone else's"
    os.remove(other)
    os.remove(folder / "moved")
    await prepare(s, folder / "disk0.raw")
    assert await delete(s, remove_created=True)
    assert not folder.exists() and root.is_dir()  # the folder it made, empty now, goes too
    assert not await delete(s, remove_created=True)  # idempotent


async def test_a_crash_between_the_record_and_the_link_is_finished_or_removed(
    env: tuple[TargetAgentServicer, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    s, root = env
    new = root / "web01-fb" / "disk0.raw"
    real = failback._link_new

    def crash(*_args: object) -> None:
        raise OSError("killed")

    monkeypatch.setattr(failback, "_link_new", crash)
    with pytest.raises(OSError):
        failback.prepare(
            fb(s).vm_dir,
            fb(s).disk_dir,
            guards=fb(s).guard,
            original=new,
            replica_format="raw",
            block_size=BS,
            create_size=SIZE,
        )
    assert not new.exists()
    monkeypatch.setattr(failback, "_link_new", real)
    got = await prepare(s, new)  # asked again: finished
    assert got.disk_size == SIZE and new.stat().st_size == SIZE
    assert await delete(s, remove_created=True)
    assert not new.exists()


async def test_a_file_there_already_and_bad_paths_are_refused_and_untouched(
    env: tuple[TargetAgentServicer, Path], tmp_path: Path
) -> None:
    s, root = env
    vm = root / "web01"
    vm.mkdir()
    existing = vm / "disk0.raw"
    existing.write_bytes(b"production")
    e = await refused(s, existing)
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION and "never overwrites" in e.details
    assert existing.read_bytes() == b"production"
    assert await delete(s, remove_created=True)  # the refused attempt's folder: the file there is not its own
    assert existing.read_bytes() == b"production"
    e = await refused(s, root / "disk0.raw")  # in the root itself: not a VM folder
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT
    e = await refused(s, tmp_path / "elsewhere" / "disk0.raw")
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT
    (root / "linked").symlink_to(tmp_path)
    e = await refused(s, root / "linked" / "new" / "disk0.raw")
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT and "symbolic link" in e.details
    assert not (tmp_path / "new").exists()
    e = await refused(s, root / "x" / "disk0.raw", size=0)
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT
    e = await refused(s, f"{root}/x/../y/disk0.raw")
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT
    bare = servicer(tmp_path / "bare")
    e = await refused(bare, root / "x" / "disk0.raw")
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION and "failback_roots" in e.details


async def test_a_link_planted_after_the_path_was_checked_is_not_followed(
    env: tuple[TargetAgentServicer, Path], tmp_path: Path
) -> None:
    s, root = env
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (root / "web01-fb").symlink_to(elsewhere)  # as if planted between the servicer's check and the link
    with pytest.raises(PathError):
        failback.prepare(
            fb(s).vm_dir,
            fb(s).disk_dir,
            guards=fb(s).guard,
            original=root / "web01-fb" / "disk0.raw",
            replica_format="raw",
            block_size=BS,
            create_size=SIZE,
        )
    assert list(elsewhere.iterdir()) == []
