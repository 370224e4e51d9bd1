"""Power cuts of a failback, in process under the recorder of vmrepl.disk.powercut: PrepareFailbackDisk, a
session writing the original disk (digest comparison: only differing blocks) and its commit. A power cut is
rebuilt just before and after every fsync and at random ops; then, as a restarted target would, the failback
folder is rolled back (RollbackReplica): the original disk is then exactly as it was, or, once the commit's
point is listed, exactly the failed-over VM's disk. Never anything in between.

The model rebuilds a file with two names as two files; the original's two names (its own and the failback
disk's link) are one node in it, so the test checks they hold the same bytes and reads the link.
Replay a run with VMREPL_POWERLOSS_SEED=<the printed seed>."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest

from target_agent import failback, replica, restore_points, vm_replica
from tests.support.mounting import BS, Replica, changed, image, sha
from vmrepl.disk import powercut
from vmrepl.errors import NotFound

CUTS = 220
FB = ".failback/job1/vm1"


def _seed() -> int:
    return int(os.environ.get("VMREPL_POWERLOSS_SEED") or random.SystemRandom().randrange(1, 1 << 31))


def _check(fs: Path, original: bytes, new: bytes) -> None:
    r = Replica(fs / "store", replica_path=FB)
    on_disk = (fs / "originals" / "disk0.raw").read_bytes()
    assert on_disk in (original, new) or r.vm_dir.is_dir(), "the original changed with no failback disk"
    if not r.vm_dir.is_dir():
        assert on_disk == original
        return
    listed = restore_points.list_points(r.vm_dir)
    link = replica.data_file(r.disk_dir, "raw")
    if link.exists():
        assert link.read_bytes() == on_disk, "the original and its link differ"
    if not listed:  # the prepare was cut before its point: nothing but reads happened to the original
        assert on_disk == original
        return
    vm_replica.roll_back(r.vm_dir, guards=r.guard)
    after = sha(link.read_bytes())
    if any(p.session_id == "fb1" for p in listed):
        assert after == sha(new), "a committed failback does not hold the new disk"
    else:
        assert after == sha(original), "a failback rolled back does not give the original back"


def test_power_cuts_of_a_failback_leave_the_original_or_the_new_disk(tmp_path: Path) -> None:
    seed = _seed()
    print(f"power-loss seed {seed} (replay: VMREPL_POWERLOSS_SEED={seed})")
    rng = random.Random(seed)
    fs = tmp_path / "fs"
    (fs / "originals").mkdir(parents=True)
    (fs / "store").mkdir()
    original = image(20, 31, tail=2000)
    new = changed(original, 32, share=0.5)
    disk = fs / "originals" / "disk0.raw"
    disk.write_bytes(original)
    r = Replica(fs / "store", replica_path=FB)
    with powercut.recording(fs) as rec:
        failback.prepare(r.vm_dir, r.disk_dir, guards=r.guard, original=disk, replica_format="raw", block_size=BS)
        r.prepare("fb1", len(new))
        r.stream("fb1", new, base=original)
        r.commit("fb1")
    assert disk.read_bytes() == new
    log = rec.log()
    cuts = powercut.cut_points(log, rng, CUTS)
    assert len(cuts) >= min(CUTS, len(log.ops) + 1)  # every op when there are fewer
    for upto in cuts:
        shutil.rmtree(fs)
        powercut.crash_state(log, upto, random.Random(f"{seed}-{upto}")).materialise(fs)
        try:
            _check(fs, original, new)
        except (AssertionError, NotFound, Exception) as e:
            pytest.fail(f"seed {seed} (VMREPL_POWERLOSS_SEED={seed}), cut after op {upto} of {len(log)}: {e!r}")


def _check_created(fs: Path, new: bytes) -> None:
    """A failback to a new location cut anywhere: an image at the new path is one the failback folder's
    record names (so DeleteReplica's remove_created finds it) and holds what the failback disk holds; once the
    commit's point is listed it is the new disk. Cut before the link, remove_created leaves no folder behind.
    (The model rebuilds the image's two names as two files with new inodes, so the inode check that
    remove_created makes before removing one is tested without cuts, in test_failback_new_location.py.)"""
    r = Replica(fs / "store", replica_path=FB)
    path = fs / "newhost" / "vm1-fb" / "disk0.raw"
    if not r.vm_dir.is_dir():
        assert not path.exists(), "an image with no failback folder to remove it"
        return
    if not path.exists():
        failback.remove_created(r.vm_dir)
        assert not path.parent.exists(), "remove_created left the folder it made"
        return
    record = failback._originals(r.vm_dir)  # what DeleteReplica reads
    assert record is not None and record["disk0"].created and record["disk0"].path == str(path), record
    assert path.read_bytes() == replica.data_file(r.disk_dir, "raw").read_bytes(), "the image and its link differ"
    listed = restore_points.list_points(r.vm_dir)
    if any(p.session_id == "fb1" for p in listed):
        assert sha(path.read_bytes()) == sha(new), "a committed failback does not hold the new disk"


def test_power_cuts_of_a_failback_to_a_new_location_leave_nothing_unnamed(tmp_path: Path) -> None:
    seed = _seed()
    print(f"power-loss seed {seed} (replay: VMREPL_POWERLOSS_SEED={seed})")
    rng = random.Random(seed)
    fs = tmp_path / "fs"
    (fs / "newhost").mkdir(parents=True)
    (fs / "store").mkdir()
    new = image(20, 41, tail=2000)
    path = fs / "newhost" / "vm1-fb" / "disk0.raw"
    r = Replica(fs / "store", replica_path=FB)
    with powercut.recording(fs) as rec:
        failback.prepare(
            r.vm_dir,
            r.disk_dir,
            guards=r.guard,
            original=path,
            replica_format="raw",
            block_size=BS,
            create_size=len(new),
        )
        r.prepare("fb1", len(new))
        r.stream("fb1", new, base=bytes(len(new)))
        r.commit("fb1")
    assert path.read_bytes() == new
    log = rec.log()
    cuts = powercut.cut_points(log, rng, CUTS)
    for upto in cuts:
        shutil.rmtree(fs)
        powercut.crash_state(log, upto, random.Random(f"{seed}-{upto}")).materialise(fs)
        try:
            _check_created(fs, new)
        except (AssertionError, NotFound, Exception) as e:
            pytest.fail(f"seed {seed} (VMREPL_POWERLOSS_SEED={seed}), cut after op {upto} of {len(log)}: {e!r}")
