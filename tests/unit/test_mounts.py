"""Mounts on the target (MountPoint, GetMount, ListMounts, UnmountPoint, FlattenMount, DeleteReplica), in
process with the target's own code: sessions really overwrite the replica (prepare, ReplicaStream, commit)
while a TEST mount is read; every mount is compared with the point's bytes as `open_point_disk` gave them
before; planted links and bad ids are refused."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest

from target_agent import mount_registry, mounts, points, removal, replica, restore_points, vm_replica
from target_agent.servicer import TargetAgentServicer
from tests.conftest import need_tool
from tests.support.mounting import BS, Replica, changed, differ, image, mount_bytes, read_all, sha
from tests.support.points import Aborted, FakeContext, servicer
from vmrepl.disk.base import create_writer, open_reader
from vmrepl.disk.layer import ExtentStore, open_layer
from vmrepl.domain import DiskFormat
from vmrepl.errors import AlreadyExists, FailedPrecondition
from vmrepl.extent import MiB
from vmrepl.v1 import target_pb2

TEST, FAILOVER, LAYER, VHDX = mount_registry.TEST, mount_registry.FAILOVER, mounts.LAYER, mounts.VHDX


def three_points(r: Replica, *, tail: int = 1000) -> tuple[list[str], list[bytes]]:
    one = image(24, 1, tail=tail)
    two = changed(one, 2)
    three = changed(two, 3)
    ids = [r.session("s1", one).id, r.session("s2", two, base=one).id, r.session("s3", three, base=two).id]
    return ids, [one, two, three]


def mount(r: Replica, vms: Path, mount_id: str, point: str, kind: str, *, layout: str = LAYER) -> mounts.MountRecord:
    return mounts.mount(
        r.store,
        mounts.MountSettings(vms),
        r.guard,
        replica_path=r.replica_path,
        point_id=point,
        mount_id=mount_id,
        kind=kind,
        layout=layout,
    )


def record(r: Replica, point: str, folder: str) -> mounts.MountRecord:
    """A mount record as a crash in MountPoint leaves it (creating), for the attacks to plant."""
    return mounts.MountRecord(
        mount_id="t1",
        replica_path=r.replica_path,
        point_id=point,
        requested_point_id=point,
        kind=TEST,
        layout=LAYER,
        state=mounts.CREATING,
        create_time=0.0,
        folder=folder,
    )


@pytest.fixture
def r(tmp_path: Path) -> Replica:
    return Replica(tmp_path / "store")


def test_a_test_mount_keeps_its_point_while_sessions_overwrite_the_replica(r: Replica, tmp_path: Path) -> None:
    vms = tmp_path / "vms"
    ids, imgs = three_points(r)
    before = {p: r.point_bytes(p) for p in ids}
    assert before[ids[0]] == imgs[0]
    old, new = mount(r, vms, "t-old", ids[0], TEST), mount(r, vms, "t-new", ids[2], TEST)
    # Only the blocks the rollback chain holds were copied for the older point; none for the newest.
    chain = {
        b for b in range(-(-len(imgs[0]) // BS)) if imgs[0][b * BS : (b + 1) * BS] != imgs[2][b * BS : (b + 1) * BS]
    }
    assert 0 < mounts.bytes_copied(old) <= len(chain) * BS
    assert mounts.bytes_copied(new) == 0
    four = changed(imgs[2], 4, share=0.7)
    r.session("s4", four, base=imgs[2])
    assert not differ(mount_bytes(old), before[ids[0]])
    assert not differ(mount_bytes(new), before[ids[2]])
    # A session that fails midway and is rolled back, then one that stops midway (its pending file kept).
    r.prepare("s5", len(four))
    r.stream("s5", changed(four, 5, share=0.9), base=four, stop_after=4)
    restore_points_list = restore_points.list_points(r.vm_dir)
    vm_replica.end_session(r.vm_dir, "s5", keep_for_resume=False, guards=r.guard)
    r.prepare("s6", len(four))
    r.stream("s6", changed(four, 6, share=0.9), base=four, stop_after=5)
    assert not differ(mount_bytes(old), before[ids[0]])
    assert not differ(mount_bytes(new), before[ids[2]])
    assert len(restore_points.list_points(r.vm_dir)) == len(restore_points_list)
    # A TEST mount made while a session is between points takes what the pending file holds too.
    mid = mount(r, vms, "t-mid", "", TEST)
    assert not differ(mount_bytes(mid), four)
    r.stream("s6", changed(four, 6, share=0.9), base=four)
    r.commit("s6")
    assert not differ(mount_bytes(mid), four)
    assert not differ(mount_bytes(old), before[ids[0]])


def test_a_test_mount_keeps_its_point_across_a_shrink_and_a_grow(r: Replica, tmp_path: Path) -> None:
    ids, imgs = three_points(r)
    m = mount(r, tmp_path / "vms", "t1", ids[1], TEST)
    small = changed(imgs[2][: 10 * BS + 77], 7)
    r.session("s4", small, base=imgs[2][: len(small)])
    assert not differ(mount_bytes(m), imgs[1])
    big = changed(small + image(20, 8), 9)
    r.session("s5", big, base=None)
    assert not differ(mount_bytes(m), imgs[1])


def test_failover_mounts_of_the_newest_and_an_older_point_read_as_the_points(r: Replica, tmp_path: Path) -> None:
    vms = tmp_path / "vms"
    ids, imgs = three_points(r)
    newest = mount(r, vms, "f-new", "", FAILOVER)
    assert newest.point_id == ids[2] and mount_bytes(newest) == r.point_bytes(ids[2]) == imgs[2]
    base = vms / "f-new" / "disk0.base"
    assert os.stat(base).st_ino == os.stat(r.disk_dir / "data.raw").st_ino  # the replica's file, not a copy
    mounts.unmount(r.store, mounts.MountSettings(vms), r.guard, "f-new")
    older = mount(r, vms, "f-old", ids[0], FAILOVER)
    assert mount_bytes(older) == r.point_bytes(ids[0]) == imgs[0]


def test_a_failover_mount_of_a_replica_between_points_reads_its_newest_point(r: Replica, tmp_path: Path) -> None:
    """A session stopped midway left blocks of its own in the replica file: the mount takes the point's."""
    ids, imgs = three_points(r)
    r.prepare("s4", len(imgs[2]))
    r.stream("s4", changed(imgs[2], 4, share=0.9), base=imgs[2], stop_after=6)
    m = mount(r, tmp_path / "vms", "f1", "", FAILOVER)
    assert m.point_id == ids[2] and mount_bytes(m) == imgs[2]


def test_a_failover_pauses_replication_until_it_is_undone(r: Replica, tmp_path: Path) -> None:
    vms = tmp_path / "vms"
    _, imgs = three_points(r)
    r.prepare("s4", len(imgs[2]))  # a stream opened before the failover stops at its next batch
    mount(r, vms, "f1", "", FAILOVER)
    with pytest.raises(FailedPrecondition, match="failed over"):
        r.stream("s4", changed(imgs[2], 4), base=imgs[2])
    with pytest.raises(FailedPrecondition, match=r"failed over \(mount f1"):
        r.prepare("s5", len(imgs[2]))
    assert r.data_bytes() == imgs[2]
    with pytest.raises(FailedPrecondition, match="is failed over"):
        mount(r, vms, "f2", "", FAILOVER)
    mounts.unmount(r.store, mounts.MountSettings(vms), r.guard, "f1")
    assert not (vms / "f1").exists()
    r.session("s5", changed(imgs[2], 5), base=imgs[2])


def test_writes_to_a_mount_never_change_the_replica_or_its_points(r: Replica, tmp_path: Path) -> None:
    ids, _ = three_points(r)
    before = {p: (r.point_bytes(p), r.point_digests(p)) for p in ids}
    data_sha = sha(r.data_bytes())
    for kind, point in ((FAILOVER, ids[2]), (TEST, ids[0])):
        m = mount(r, tmp_path / "vms", f"m-{kind}", point, kind)
        disk = open_layer(Path(m.folder) / "disk0.layer", writable=True)
        try:
            for b in range(0, disk.size // BS, 3):
                disk.write(b * BS, b"\xa5" * BS)
            got = read_all(disk)
        finally:
            disk.close()
        assert got[:BS] == b"\xa5" * BS and got != before[point][0]
        assert {p: (r.point_bytes(p), r.point_digests(p)) for p in ids} == before
        assert sha(r.data_bytes()) == data_sha
        mounts.unmount(r.store, mounts.MountSettings(tmp_path / "vms"), r.guard, m.mount_id)


def test_a_mounted_point_is_kept_from_retention_and_its_replica_from_deletion(r: Replica, tmp_path: Path) -> None:
    vms = tmp_path / "vms"
    ids, _ = three_points(r)
    mount(r, vms, "t1", ids[1], TEST)
    with pytest.raises(FailedPrecondition, match=r"mounted \(t1"):
        restore_points.delete(r.vm_dir, ids[1], guard=r.guard)
    restore_points.delete(r.vm_dir, ids[0], guard=r.guard)  # another point goes as usual
    with pytest.raises(FailedPrecondition, match=r"is mounted \(t1"):
        removal.delete_replica(r.store, r.guard, r.replica_path)
    mounts.unmount(r.store, mounts.MountSettings(vms), r.guard, "t1")
    restore_points.delete(r.vm_dir, ids[1], guard=r.guard)
    assert removal.delete_replica(r.store, r.guard, r.replica_path)
    assert not r.vm_dir.exists() and not any(r.store.trash_dir.iterdir())
    assert not removal.delete_replica(r.store, r.guard, r.replica_path)


def test_delete_replica_leaves_what_is_no_part_of_a_replica(r: Replica) -> None:
    three_points(r)
    (r.vm_dir / "nested").mkdir()
    with pytest.raises(FailedPrecondition, match="holds nested"):
        removal.delete_replica(r.store, r.guard, r.replica_path)
    assert restore_points.list_points(r.vm_dir)


def test_flatten_makes_the_folder_stand_alone_and_the_replica_deletable(r: Replica, tmp_path: Path) -> None:
    vms = tmp_path / "vms"
    ids, imgs = three_points(r)
    m = mount(r, vms, "f1", ids[0], FAILOVER)
    with open_layer(Path(m.folder) / "disk0.layer", writable=True) as disk:
        disk.write(3 * BS, b"\x5a" * BS)
        want = read_all(disk)
    with pytest.raises(FailedPrecondition, match="test failover"):
        mounts.flatten(r.store, r.guard, mount(r, vms, "t1", ids[1], TEST).mount_id)
    mounts.unmount(r.store, mounts.MountSettings(vms), r.guard, "t1")
    flat = mounts.flatten(r.store, r.guard, "f1")
    assert flat.state == mounts.FLATTENED and flat.disks[0].path == "disk0.base" and flat.disks[0].format == "raw"
    assert mounts.flatten(r.store, r.guard, "f1").state == mounts.FLATTENED  # idempotent
    with pytest.raises(FailedPrecondition, match="permanent failover"):
        restore_points.list_points(r.vm_dir)
    assert removal.delete_replica(r.store, r.guard, r.replica_path)
    with open_reader(DiskFormat.RAW, Path(m.folder) / "disk0.base") as plain:
        assert not differ(read_all(plain), want)
    assert mounts.unmount(r.store, mounts.MountSettings(vms), r.guard, "f1") is not None
    assert (Path(m.folder) / "disk0.base").exists()  # the VM's own disk now: an unmount leaves it
    assert mounts.load_record(r.store, "f1") is None
    del imgs


def test_vhdx_layout(tmp_path: Path) -> None:
    r = Replica(tmp_path / "store", replica_format="vhdx")
    vms = tmp_path / "vms"
    ids, imgs = three_points(r, tail=0)
    newest = mount(r, vms, "h-new", "", FAILOVER, layout=VHDX)
    assert os.stat(vms / "h-new" / "disk0.vhdx").st_ino == os.stat(r.disk_dir / "data.vhdx").st_ino
    assert newest.bytes_copied == 0 and mount_bytes(newest) == imgs[2]
    mounts.unmount(r.store, mounts.MountSettings(vms), r.guard, "h-new")
    assert (r.disk_dir / "data.vhdx").exists()
    older = mount(r, vms, "h-old", ids[0], TEST, layout=VHDX)
    assert os.stat(vms / "h-old" / "disk0.vhdx").st_nlink == 1  # a copy: sessions go on writing the replica
    assert not differ(mount_bytes(older), imgs[0])
    assert 0 < older.bytes_copied <= len(imgs[0])
    copy = vms / "h-old" / "disk0.vhdx"
    check = subprocess.run([need_tool("qemu-img"), "check", "-q", "-f", "vhdx", str(copy)], check=False)
    assert check.returncode == 0  # a VHDX other readers (Hyper-V's) open
    four = changed(imgs[2], 4, share=0.8)
    r.session("s4", four, base=imgs[2])
    assert not differ(mount_bytes(older), imgs[0])
    # A session stopped between points: the newest point is copied, not the replica's file linked.
    r.prepare("s5", len(four))
    r.stream("s5", changed(four, 5, share=0.9), base=four, stop_after=3)
    between = mount(r, vms, "h-between", "", FAILOVER, layout=VHDX)
    assert os.stat(vms / "h-between" / "disk0.vhdx").st_nlink == 1
    assert not differ(mount_bytes(between), four)


def test_mount_point_is_idempotent_and_refuses_another_mount_under_its_id(r: Replica, tmp_path: Path) -> None:
    vms = tmp_path / "vms"
    ids, imgs = three_points(r)
    m = mount(r, vms, "t1", ids[0], TEST)
    again = mount(r, vms, "t1", ids[0], TEST)
    assert again.create_time == m.create_time and mount_bytes(again) == imgs[0]
    with pytest.raises(AlreadyExists):
        mount(r, vms, "t1", ids[1], TEST)
    with pytest.raises(AlreadyExists):
        mount(r, vms, "t1", ids[0], FAILOVER)
    assert mounts.unmount(r.store, mounts.MountSettings(vms), r.guard, "t1") is not None
    assert mounts.unmount(r.store, mounts.MountSettings(vms), r.guard, "t1") is None


def test_a_mount_cut_short_is_finished_by_mount_point_or_removed_by_unmount(
    r: Replica, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vms = tmp_path / "vms"
    ids, imgs = three_points(r)
    real = mounts._copy_blocks
    calls = {"n": 0}

    def dies(*args: object, **kwargs: object) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError("the process died here")
        real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(mounts, "_copy_blocks", dies)
    with pytest.raises(OSError):
        mount(r, vms, "t1", ids[0], TEST)
    rec = mounts.load_record(r.store, "t1")
    assert rec is not None and rec.state == mounts.CREATING
    with pytest.raises(FailedPrecondition, match=r"mounted \(t1"):  # its point is held from the first step
        restore_points.delete(r.vm_dir, ids[0], guard=r.guard)
    done = mount(r, vms, "t1", "", TEST)  # the same id finishes it ("" takes the point it was made for)
    assert done.state == mounts.MOUNTED and mount_bytes(done) == imgs[0]
    with pytest.raises(OSError):
        calls["n"] = 0
        mount(r, vms, "t2", ids[1], TEST)
    mounts.unmount(r.store, mounts.MountSettings(vms), r.guard, "t2")
    assert not (vms / "t2").exists() and mounts.load_record(r.store, "t2") is None
    assert not mount_registry.path_of(r.vm_dir, "t2").exists()


# ---- attacks -------------------------------------------------------------------------------------


def test_a_link_planted_as_a_mount_folder_is_refused_and_never_followed(r: Replica, tmp_path: Path) -> None:
    vms, elsewhere = tmp_path / "vms", tmp_path / "elsewhere"
    vms.mkdir()
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    ids, _ = three_points(r)
    (vms / "t1").symlink_to(elsewhere)
    with pytest.raises(AlreadyExists):
        mount(r, vms, "t1", ids[0], TEST)
    assert os.listdir(elsewhere) == ["keep.txt"]
    # A mount whose folder was replaced by a link after it was made: the unmount removes the link only.
    (vms / "t1").unlink()
    m = mount(r, vms, "t1", ids[0], TEST)
    os.rename(m.folder, tmp_path / "moved")
    (vms / "t1").symlink_to(elsewhere)
    # Meanwhile a session cannot keep the point's bytes: it stops before overwriting anything.
    with pytest.raises(FailedPrecondition, match="test mount t1"):
        r.session("s4", changed(r.images["s3"], 4), base=r.images["s3"])
    mounts.unmount(r.store, mounts.MountSettings(vms), r.guard, "t1")
    assert not os.path.lexists(vms / "t1") and os.listdir(elsewhere) == ["keep.txt"]


def test_links_planted_in_a_mount_folder_are_not_followed(r: Replica, tmp_path: Path) -> None:
    vms, victim = tmp_path / "vms", tmp_path / "victim.raw"
    victim.write_bytes(b"v" * 4096)
    ids, imgs = three_points(r)
    folder = vms / "t1"
    folder.mkdir(parents=True)
    # A crash left a record; someone planted a link where the base goes.
    rec = record(r, ids[0], str(folder))
    rec.disks = [
        mounts.MountDisk(disk_id="disk0", path="disk0.layer", format="layer", size=len(imgs[0]), base_format="raw")
    ]
    mounts.save_record(r.store, rec)
    (folder / "disk0.base").symlink_to(victim)
    (folder / "disk0.point.raw").symlink_to(victim)
    done = mount(r, vms, "t1", ids[0], TEST)
    assert mount_bytes(done) == imgs[0] and victim.read_bytes() == b"v" * 4096


def test_a_damaged_registration_stops_writers_with_its_name(r: Replica, tmp_path: Path) -> None:
    _, imgs = three_points(r)
    mount(r, tmp_path / "vms", "t1", "", TEST)
    mount_registry.path_of(r.vm_dir, "t1").write_text('{"format": 1, "mount_id": "../x"}')
    with pytest.raises(FailedPrecondition, match=r"t1\.json is damaged"):
        r.session("s4", changed(imgs[2], 4), base=imgs[2])
    assert r.data_bytes() == imgs[2]


def api(tmp_path: Path, **settings: object) -> tuple[TargetAgentServicer, Replica]:
    s = servicer(tmp_path, **settings)
    r = Replica(s.datastore.root)
    three_points(r)
    return s, r


async def test_the_api_checks_names_kinds_and_settings(tmp_path: Path) -> None:
    s, r = api(tmp_path / "a", vm_root=tmp_path / "a" / "vms", vm_root_host_path="D:\\vmrepl\\vms")
    ctx = FakeContext()

    async def refused(request: target_pb2.MountPointRequest) -> Aborted:
        with pytest.raises(Aborted) as e:
            await s.MountPoint(request, ctx)  # type: ignore[arg-type]
        return e.value

    def req(**change: object) -> target_pb2.MountPointRequest:
        out = target_pb2.MountPointRequest(
            replica_path=r.replica_path,
            mount_id="m1",
            kind=target_pb2.MOUNT_KIND_TEST,
            layout=target_pb2.MOUNT_LAYOUT_LAYER,
        )
        for k, v in change.items():
            setattr(out, k, v)
        return out

    for bad in ("a/b", "..", "", "a.b", "x" * 65, "../../etc"):
        e = await refused(req(mount_id=bad))
        assert e.code == grpc.StatusCode.INVALID_ARGUMENT and "mount_id" in e.details
    assert (await refused(req(kind=0))).code == grpc.StatusCode.INVALID_ARGUMENT
    assert (await refused(req(layout=0))).code == grpc.StatusCode.INVALID_ARGUMENT
    assert (await refused(req(replica_path="../x"))).code == grpc.StatusCode.INVALID_ARGUMENT
    assert (await refused(req(point_id="nope"))).code == grpc.StatusCode.NOT_FOUND
    m = await s.MountPoint(req(), ctx)  # type: ignore[arg-type]
    assert m.state == target_pb2.MOUNT_STATE_MOUNTED and m.folder == "m1" and m.host_folder == "D:\\vmrepl\\vms\\m1"
    assert [(d.disk_id, d.path, d.format) for d in m.disks] == [("disk0", "disk0.layer", 4)]
    got = await s.GetMount(target_pb2.GetMountRequest(mount_id="m1"), ctx)  # type: ignore[arg-type]
    assert got == m
    listed = await s.ListMounts(target_pb2.ListMountsRequest(replica_path=r.replica_path), ctx)  # type: ignore[arg-type]
    assert [x.mount_id for x in listed.mounts] == ["m1"]
    other = await s.ListMounts(target_pb2.ListMountsRequest(replica_path="jobs/other"), ctx)  # type: ignore[arg-type]
    assert not other.mounts
    e2 = await s.DeleteReplica(target_pb2.DeleteReplicaRequest(replica_path="jobs/none"), ctx)  # type: ignore[arg-type]
    assert not e2.deleted
    with pytest.raises(Aborted) as refused_delete:
        await s.DeleteReplica(target_pb2.DeleteReplicaRequest(replica_path=r.replica_path), ctx)  # type: ignore[arg-type]
    assert refused_delete.value.code == grpc.StatusCode.FAILED_PRECONDITION
    gone = await s.UnmountPoint(target_pb2.UnmountPointRequest(mount_id="m1"), ctx)  # type: ignore[arg-type]
    assert gone.state == target_pb2.MOUNT_STATE_GONE
    gone = await s.UnmountPoint(target_pb2.UnmountPointRequest(mount_id="m1"), ctx)  # type: ignore[arg-type]
    assert gone.state == target_pb2.MOUNT_STATE_GONE
    with pytest.raises(Aborted) as missing:
        await s.GetMount(target_pb2.GetMountRequest(mount_id="m1"), ctx)  # type: ignore[arg-type]
    assert missing.value.code == grpc.StatusCode.NOT_FOUND
    deleted = await s.DeleteReplica(target_pb2.DeleteReplicaRequest(replica_path=r.replica_path), ctx)  # type: ignore[arg-type]
    assert deleted.deleted

    s2, _ = api(tmp_path / "b")  # no vm_root
    with pytest.raises(Aborted) as unset:
        await s2.MountPoint(req(), ctx)  # type: ignore[arg-type]
    assert unset.value.code == grpc.StatusCode.FAILED_PRECONDITION and "vm_root" in unset.value.details


def test_a_layer_mount_over_a_vhdx_replica_keeps_its_point(tmp_path: Path) -> None:
    r = Replica(tmp_path / "store", replica_format="vhdx")
    ids, imgs = three_points(r, tail=0)
    m = mount(r, tmp_path / "vms", "t1", ids[0], TEST)
    assert m.disks[0].base_format == "vhdx" and mount_bytes(m) == imgs[0]
    r.session("s4", changed(imgs[2], 4, share=0.9), base=imgs[2])
    r.prepare("s5", len(imgs[2]))
    r.stream("s5", changed(imgs[2], 5, share=0.9), base=None, stop_after=4)
    assert not differ(mount_bytes(m), imgs[0])
    vm_replica.roll_back(r.vm_dir, guards=r.guard)
    assert not differ(mount_bytes(m), imgs[0])


@pytest.mark.parametrize("delay", [0.0, 0.002, 0.01])
def test_a_test_mount_made_while_a_session_writes_keeps_its_point(r: Replica, tmp_path: Path, delay: float) -> None:
    """The session's stream runs in another thread, batch after batch, while MountPoint copies the chain,
    switches copy-on-write on and copies the pending file: whichever batch lands where, the mount reads as
    its point (and a second mount made after the session as well)."""
    ids, imgs = three_points(r)
    want = {p: r.point_bytes(p) for p in ids}
    nxt = changed(imgs[2], 40, share=0.95)
    r.prepare("s4", len(nxt))
    real_apply = replica.ReplicaStream.apply

    def slow_apply(self: replica.ReplicaStream, batch: object) -> int:
        time.sleep(delay)
        return real_apply(self, batch)  # type: ignore[arg-type]

    errors: list[BaseException] = []

    def session() -> None:
        try:
            r.stream("s4", nxt, base=None)
        except BaseException as e:
            errors.append(e)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(replica.ReplicaStream, "apply", slow_apply)
        writer = threading.Thread(target=session)
        writer.start()
        old, new = mount(r, tmp_path / "vms", "t-old", ids[0], TEST), mount(r, tmp_path / "vms", "t-new", "", TEST)
        writer.join()
    assert not errors
    r.commit("s4")
    assert not differ(mount_bytes(old), want[ids[0]])
    assert not differ(mount_bytes(new), want[ids[2]])


def test_planted_records_and_folders_of_the_target_are_refused(r: Replica, tmp_path: Path) -> None:
    vms, elsewhere = tmp_path / "vms", tmp_path / "elsewhere"
    elsewhere.mkdir()
    ids, imgs = three_points(r)
    # A record (of a mount "cut short") naming a folder outside vm_root: nothing is made there.
    rec = record(r, ids[0], str(elsewhere))
    rec.folder = str(elsewhere / "t1")
    mounts.save_record(r.store, rec)
    with pytest.raises(FailedPrecondition, match="not in vm_root"):
        mount(r, vms, "t1", ids[0], TEST)
    with pytest.raises(FailedPrecondition, match="not under vm_root"):
        mounts.unmount(r.store, mounts.MountSettings(vms), r.guard, "t1")
    assert not (elsewhere / "t1").exists()
    mounts._record_path(r.store, "t1").write_text("{not json")
    with pytest.raises(FailedPrecondition, match="damaged"):
        mounts.list_records(r.store)
    mounts._record_path(r.store, "t1").unlink()
    # The records' folder and the trash replaced by links: refused, nothing written through them.
    os.rename(r.store.mounts_dir, tmp_path / "old-mounts")
    r.store.mounts_dir.symlink_to(elsewhere)
    with pytest.raises(FailedPrecondition, match="symbolic link"):
        mount(r, vms, "t2", ids[0], TEST)
    r.store.mounts_dir.unlink()
    r.store.trash_dir.symlink_to(elsewhere)
    with pytest.raises(FailedPrecondition, match="symbolic link"):
        removal.delete_replica(r.store, r.guard, r.replica_path)
    assert os.listdir(elsewhere) == [] and r.point_bytes(ids[0]) == imgs[0]


def test_blocks_overwritten_before_copy_on_write_starts_come_from_the_pending_file(
    r: Replica, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session writing between the chain's copy and the switch to copy-on-write: its blocks reach the mount
    through the pending rollback file (the last step of MountPoint), never as the session's bytes."""
    ids, imgs = three_points(r)
    want = r.point_bytes(ids[0])
    nxt = changed(imgs[2], 50, share=1.0)
    r.prepare("s4", len(nxt))
    real = mount_registry.register

    def session_first(vm_dir: Path, reg: mount_registry.Registration) -> None:
        if reg.cow:
            r.stream("s4", nxt, base=None)
        real(vm_dir, reg)

    monkeypatch.setattr(mount_registry, "register", session_first)
    m = mount(r, tmp_path / "vms", "t1", ids[0], TEST)
    assert r.data_bytes() == nxt  # the session did overwrite the replica meanwhile
    assert not differ(mount_bytes(m), want)
    r.commit("s4")
    assert not differ(mount_bytes(m), want)


def test_a_session_writing_before_the_chain_is_copied_never_reaches_the_point_store(
    r: Replica, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Copy-on-write starts only once the chain is copied: earlier it would keep the newest point's bytes
    of a block the older point held otherwise (first writer wins)."""
    ids, imgs = three_points(r)
    want = r.point_bytes(ids[0])
    nxt = changed(imgs[2], 51, share=1.0)
    r.prepare("s4", len(nxt))
    real = mounts._copy_blocks
    calls = {"n": 0}

    def session_first(pd: points.PointDisk, store: ExtentStore, blocks: list[int]) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            r.stream("s4", nxt, base=None)
        real(pd, store, blocks)

    monkeypatch.setattr(mounts, "_copy_blocks", session_first)
    m = mount(r, tmp_path / "vms", "t1", ids[0], TEST)
    assert not differ(mount_bytes(m), want)
    r.commit("s4")
    assert not differ(mount_bytes(m), want)


def test_flatten_never_writes_a_base_or_descriptor_planted_in_the_mount_folder(r: Replica, tmp_path: Path) -> None:
    # The failed-over VM's folder is a file host's VM folder: whoever may write it swaps the base for a hard
    # link of another replica's data file (same file system), or points the descriptor at one. A permanent
    # failover would merge the VM's writes into that replica.
    vms = tmp_path / "vms"
    ids, _ = three_points(r)
    other = Replica(r.store.root, replica_path="jobs/vm2")
    other.session("o1", image(24, 9, tail=1000))
    victim = other.disk_dir / "data.raw"
    before = sha(victim.read_bytes())
    m = mount(r, vms, "f1", ids[0], FAILOVER)
    folder = Path(m.folder)
    with open_layer(folder / "disk0.layer", writable=True) as disk:
        disk.write(0, b"\x5a" * (4 * BS))
    (folder / "disk0.base").unlink()
    os.link(victim, folder / "disk0.base")
    with pytest.raises(FailedPrecondition, match="not the replica's data file"):
        mounts.flatten(r.store, r.guard, "f1")
    os.unlink(folder / "disk0.base")
    os.link(r.disk_dir / "data.raw", folder / "disk0.base")
    os.link(victim, folder / "evil.raw")
    layer = folder / "disk0.layer"
    layer.write_bytes(layer.read_bytes().replace(b'"disk0.base"', b'"evil.raw"'))
    with pytest.raises(FailedPrecondition, match=r"names evil\.raw"):
        mounts.flatten(r.store, r.guard, "f1")
    assert sha(victim.read_bytes()) == before
    assert other.point_bytes(restore_points.list_points(other.vm_dir)[-1].id) == victim.read_bytes()


@pytest.mark.parametrize("store", ["top", "point"])
def test_a_mount_cut_short_is_not_finished_over_bytes_planted_in_its_stores(
    r: Replica, tmp_path: Path, store: str
) -> None:
    # A crash left the mount `creating`, its folder whole; someone writes the failed-over VM's disk through
    # its stores before MountPoint is asked again. Finished as it is, the VM would boot those bytes.
    vms = tmp_path / "vms"
    ids, imgs = three_points(r)
    rec = mount(r, vms, "f1", ids[0], FAILOVER)
    rec.state = mounts.CREATING
    mounts.save_record(r.store, rec)
    planted = ExtentStore(Path(rec.folder), f"disk0.{store}", size=len(imgs[0]))
    planted.write(2 * BS, b"\xee" * BS)
    with pytest.raises(FailedPrecondition, match=f"disk0.{store}"):
        mount(r, vms, "f1", ids[0], FAILOVER)
    assert mounts.load_record(r.store, "f1").state == mounts.CREATING  # type: ignore[union-attr]
    mounts.unmount(r.store, mounts.MountSettings(vms), r.guard, "f1")
    assert not differ(mount_bytes(mount(r, vms, "f2", ids[0], FAILOVER)), imgs[0])


def test_a_vhdx_mount_cut_short_is_not_finished_with_a_planted_image(tmp_path: Path) -> None:
    # A crash left a VHDX mount `creating`; someone put an image of their own where its copy goes (a single
    # link, a valid VHDX). Taken for the earlier attempt's copy, the failed-over VM would boot it.
    r = Replica(tmp_path / "store", replica_format="vhdx")
    vms = tmp_path / "vms"
    ids, imgs = three_points(r, tail=0)
    rec = mount(r, vms, "h1", ids[0], FAILOVER, layout=VHDX)
    assert not differ(mount_bytes(rec), imgs[0])
    rec.state = mounts.CREATING
    mounts.save_record(r.store, rec)
    copy = Path(rec.folder) / "disk0.vhdx"
    copy.unlink()
    with create_writer(DiskFormat.VHDX, copy, size=len(imgs[0]), block_size=MiB) as w:
        w.write(b"\xee" * BS, 0)
        w.flush()
    again = mount(r, vms, "h1", ids[0], FAILOVER, layout=VHDX)
    assert again.state == mounts.MOUNTED and mount_bytes(again) == imgs[0]
    assert mount(r, vms, "h1", ids[0], FAILOVER, layout=VHDX) == again  # idempotent once mounted
