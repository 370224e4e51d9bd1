"""Power cuts of MountPoint and of the copy-on-write path, in process under the recorder of
vmrepl.disk.powercut: a TEST mount of an older point is made, then sessions overwrite the replica (one
committed, one stopped midway); a power cut is rebuilt just before and after every fsync and at random ops,
and the datastore and vm_root opened as a restarted target would:

* a mount whose MountPoint returned is `mounted` and reads exactly its point's bytes, whatever the sessions
  had written when the power went (the old bytes reach its point store durably before any overwrite);
* a mount cut short is finished by MountPoint with the same id, and then reads its point; UnmountPoint
  removes every trace of it;
* the point itself still reads as it did, and a session run after the cut leaves the mount at its point.

The model rebuilds a file with two names as two files: where both names are there the test links them
again (after checking they hold the same bytes), as the file system would have kept them.
Replay a run with VMREPL_POWERLOSS_SEED=<the printed seed>."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest

from target_agent import mount_registry, mounts, removal, replica
from tests.support.mounting import BS, Replica, changed, differ, image, mount_bytes, read_all
from vmrepl.disk import powercut
from vmrepl.disk.layer import open_layer
from vmrepl.errors import FailedPrecondition

CUTS = 260


def _seed() -> int:
    return int(os.environ.get("VMREPL_POWERLOSS_SEED") or random.SystemRandom().randrange(1, 1 << 31))


def _relink(rec: mounts.MountRecord, r: Replica) -> None:
    """The base of each LAYER disk a hard link of the replica's data file again (the model split them)."""
    for d in rec.disks:
        base = Path(rec.folder) / f"{d.disk_id}.base"
        data = replica.data_file(r.vm_dir / "disks" / d.disk_id, d.base_format)
        if base.exists() and data.exists() and os.stat(base).st_ino != os.stat(data).st_ino:
            assert base.read_bytes() == data.read_bytes(), "a mount's base and the replica's data file differ"
            base.unlink()
            os.link(data, base)


def _check_cut(fs: Path, r: Replica, vms: Path, want: bytes, point_id: str, *, acked: bool, run_on: bool) -> None:
    store = r.store
    rec = mounts.load_record(store, "t1")
    if acked:
        assert rec is not None and rec.state == mounts.MOUNTED, "a mount MountPoint answered is not mounted"
    if rec is None:
        assert not os.path.lexists(vms / "t1"), "a mount folder without a record"
        assert not any(r.point_id == point_id for r in mount_registry.registrations(r.vm_dir))
        return
    _relink(rec, r)
    assert not differ(r.point_bytes(point_id), want)
    if rec.state == mounts.CREATING:
        rec = mounts.mount(
            store, mounts.MountSettings(vms), r.guard, replica_path=r.replica_path, point_id="", mount_id="t1",
            kind=mount_registry.TEST, layout=mounts.LAYER,
        )  # fmt: skip
    assert not differ(mount_bytes(rec), want), "the mount does not read as its point"
    if run_on:  # a session after the restart (rolling back or resuming what the cut left) keeps it so
        last = r.images["s4"]
        r.prepare("s9", len(last))
        r.stream("s9", changed(last, 99, share=0.8), base=None)
        r.commit("s9")
        assert not differ(mount_bytes(rec), want), "the mount does not read as its point after the next session"
    mounts.unmount(store, mounts.MountSettings(vms), r.guard, "t1")
    assert not os.path.lexists(vms / "t1") and mounts.load_record(store, "t1") is None
    assert not mount_registry.registrations(r.vm_dir)


@pytest.mark.parametrize("between", [False, True], ids=["at a point", "a session between points"])
def test_power_cuts_of_a_mount_and_of_copy_on_write_leave_it_at_its_point(tmp_path: Path, between: bool) -> None:
    """`between`: a session had overwritten blocks (its pending rollback file holds them) when the mount was
    made, so the mount copies from that file too; the session then goes on."""
    seed = _seed()
    print(f"power-loss seed {seed} (replay: VMREPL_POWERLOSS_SEED={seed})")
    rng = random.Random(seed)
    fs = tmp_path / "fs"
    vms = fs / "vms"
    r = Replica(fs / "store")
    vms.mkdir(parents=True)
    one = image(16, 1, tail=3000)
    two, three = changed(one, 2), changed(changed(one, 2), 3)
    p1 = r.session("s1", one)
    r.session("s2", two, base=one)
    r.session("s3", three, base=two)
    want = r.point_bytes(p1.id)
    four = changed(three, 4, share=0.8)
    if between:
        r.prepare("s4", len(four))
        r.stream("s4", four, base=three, stop_after=4)
    with powercut.recording(fs) as rec:
        mounts.mount(
            r.store, mounts.MountSettings(vms), r.guard, replica_path=r.replica_path, point_id=p1.id, mount_id="t1",
            kind=mount_registry.TEST, layout=mounts.LAYER,
        )  # fmt: skip
        mounted_at = rec.position()
        if between:
            r.stream("s4", four, base=three)  # the same session goes on from its committed offset
            r.commit("s4")
        else:
            r.session("s4", four, base=three)
        r.images["s4"] = four
        r.prepare("s5", len(four))
        r.stream("s5", changed(four, 5, share=0.9), base=four, stop_after=5)
    log = rec.log()
    cuts = powercut.cut_points(log, rng, CUTS)
    assert len(cuts) >= min(CUTS, len(log.ops) + 1)
    images = dict(r.images)
    for n, upto in enumerate(cuts):
        shutil.rmtree(fs)
        powercut.crash_state(log, upto, random.Random(f"{seed}-{upto}")).materialise(fs)
        cut = Replica(fs / "store", images=dict(images))
        try:
            _check_cut(fs, cut, vms, want, p1.id, acked=mounted_at - 1 <= upto, run_on=n % 7 == 0)
        except (AssertionError, Exception) as e:
            pytest.fail(f"seed {seed} (VMREPL_POWERLOSS_SEED={seed}), cut after op {upto} of {len(log)}: {e}")


def test_the_check_catches_copy_on_write_left_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The harness can fail: without the copy into the point store, the mount reads the replica's new bytes."""
    monkeypatch.setattr(mount_registry, "_copy_old", lambda *a, **k: None)
    fs = tmp_path / "fs"
    vms = fs / "vms"
    r = Replica(fs / "store")
    vms.mkdir(parents=True)
    one = image(8, 1)
    p1 = r.session("s1", one)
    r.session("s2", changed(one, 2), base=one)
    mounts.mount(
        r.store, mounts.MountSettings(vms), r.guard, replica_path=r.replica_path, point_id=p1.id, mount_id="t1",
        kind=mount_registry.TEST, layout=mounts.LAYER,
    )  # fmt: skip
    r.session("s3", changed(r.images["s2"], 3, share=0.9), base=r.images["s2"])
    rec = mounts.load_record(r.store, "t1")
    assert rec is not None
    try:
        wrong = differ(mount_bytes(rec), one)
    except FailedPrecondition as e:  # the layer refused: as good as a failed check
        wrong = str(e)
    assert wrong, "a mount without the copy into its point store still read as its point"


def _check_teardown(r: Replica, vms: Path, want_flat: bytes) -> None:
    """After a cut of unmount, flatten and DeleteReplica: each finishes when asked again, and the failed-over
    VM's disk reads as it did (layered or flattened)."""
    settings = mounts.MountSettings(vms)
    t1 = mounts.load_record(r.store, "t1")
    if t1 is None:
        assert not os.path.lexists(vms / "t1"), "an unmounted mount's folder is left"
    mounts.unmount(r.store, settings, r.guard, "t1")
    assert not os.path.lexists(vms / "t1") and mounts.load_record(r.store, "t1") is None
    f1 = mounts.load_record(r.store, "f1")
    assert f1 is not None and f1.state in (mounts.MOUNTED, mounts.FLATTENING, mounts.FLATTENED)
    if f1.state == mounts.MOUNTED:
        _relink(f1, r)
        assert not differ(mount_bytes(f1), want_flat)
    f1 = mounts.flatten(r.store, r.guard, "f1")
    assert f1.state == mounts.FLATTENED and mount_bytes(f1) == want_flat
    removal.empty_trash(r.store)  # as a restarted target does
    if r.vm_dir.exists():
        removal.delete_replica(r.store, r.guard, r.replica_path)
    assert not r.vm_dir.exists() and not any(r.store.trash_dir.iterdir())
    assert not differ(mount_bytes(f1), want_flat)


def test_power_cuts_of_unmount_flatten_and_delete_replica(tmp_path: Path) -> None:
    seed = _seed()
    print(f"power-loss seed {seed} (replay: VMREPL_POWERLOSS_SEED={seed})")
    rng = random.Random(seed)
    fs = tmp_path / "fs"
    vms = fs / "vms"
    r = Replica(fs / "store")
    vms.mkdir(parents=True)
    one = image(12, 1, tail=3000)
    p1 = r.session("s1", one)
    two = changed(one, 2)
    r.session("s2", two, base=one)
    settings = mounts.MountSettings(vms)

    def make(mount_id: str, point: str, kind: str) -> mounts.MountRecord:
        return mounts.mount(
            r.store, settings, r.guard, replica_path=r.replica_path, point_id=point, mount_id=mount_id, kind=kind,
            layout=mounts.LAYER,
        )  # fmt: skip

    make("t1", p1.id, mount_registry.TEST)
    f1 = make("f1", p1.id, mount_registry.FAILOVER)
    with open_layer(Path(f1.folder) / "disk0.layer", writable=True) as vm_disk:  # what the failed-over VM wrote
        vm_disk.write(2 * BS + 100, b"\x77" * (BS + 5))
        want_flat = read_all(vm_disk)
    with powercut.recording(fs) as rec:
        mounts.unmount(r.store, settings, r.guard, "t1")
        mounts.flatten(r.store, r.guard, "f1")
        removal.delete_replica(r.store, r.guard, r.replica_path)
    log = rec.log()
    cuts = powercut.cut_points(log, rng, CUTS)
    assert len(cuts) >= min(CUTS, len(log.ops) + 1)
    for upto in cuts:
        shutil.rmtree(fs)
        powercut.crash_state(log, upto, random.Random(f"{seed}-{upto}")).materialise(fs)
        try:
            _check_teardown(Replica(fs / "store"), vms, want_flat)
        except Exception as e:
            pytest.fail(f"seed {seed} (VMREPL_POWERLOSS_SEED={seed}), cut after op {upto} of {len(log)}: {e!r}")
