"""Planted files and links inside a target's datastore (in-process, the target's own code on real files).

Whoever can write the datastore (a restore by hand gone wrong, a second tool, an attacker with the
service's group) can leave symbolic links and odd files there. The target must never write, truncate,
rename or remove anything outside its datastore root through them, never read from outside through them,
refuse with FAILED_PRECONDITION naming what it found, and lose nothing the replica holds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import shutil
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from target_agent import replica, restore_points, rollback, vm_replica
from target_agent.points import open_point_disk
from tests.unit.test_restore_point_data import BS, SIZE, Replica, _random_blocks, differing
from vmrepl.batch import DecodedBatch, DecodedExtent, PassDigest
from vmrepl.block import digest
from vmrepl.disk import open_reader
from vmrepl.domain import DiskFormat
from vmrepl.errors import InvalidArgument, VmreplError

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX symbolic links")
VICTIM = b"precious bytes outside the datastore\n" * 8


@contextlib.contextmanager
def refused(match: str) -> Iterator[None]:
    """The call fails with FAILED_PRECONDITION, its message matching `match`."""
    with pytest.raises(VmreplError, match=match) as err:
        yield
    assert err.value.grpc_code == "FAILED_PRECONDITION", err.value


class Planted:
    """A replica at a restore point (`p0`) with a session's writes on top (`s1`, between points), and a
    victim file and folder outside the replica whose bytes must not change."""

    def __init__(self, tmp_path: Path) -> None:
        self.rep = Replica(tmp_path / "root")
        self.outside = tmp_path / "outside"
        self.outside.mkdir()
        self.victim = self.outside / "victim"
        self.victim.write_bytes(VICTIM)
        rng = random.Random(41)
        self.image = bytearray(SIZE)
        self.rep.write("s0", self.image, _random_blocks(rng, 64))
        self.p0 = self.rep.commit("s0", self.image)
        self.rep.write("s1", bytearray(self.image), _random_blocks(rng, 12))

    @property
    def disk(self) -> Path:
        return self.rep.disk

    def outside_untouched(self) -> bool:
        return self.victim.read_bytes() == VICTIM and sorted(os.listdir(self.outside)) == ["victim"]

    def link(self, name: str, to: Path) -> None:
        path = self.disk / name
        path.unlink()
        path.symlink_to(to)


@pytest.fixture
def planted(tmp_path: Path) -> Planted:
    return Planted(tmp_path)


@pytest.fixture
def rep(tmp_path: Path) -> Replica:
    return Replica(tmp_path)


def _prepare(p: Planted, session: str) -> replica.DiskState:
    return vm_replica.prepare_disk(
        p.rep.vm, p.disk, guards=p.rep.guard, disk_size=SIZE, block_size=BS, session_id=session,
        checkpoint_id=f"cp-{session}",
    )  # fmt: skip


@pytest.mark.parametrize("name", [replica.DATA_FILE, replica.DIGESTS_FILE])
def test_a_replica_file_linked_outside_the_root_is_never_written_through(planted: Planted, name: str) -> None:
    copy = planted.outside / "copy"
    shutil.copyfile(planted.disk / name, copy)
    before = copy.read_bytes()
    planted.link(name, copy)
    with refused(f"{name} is a symbolic link"):
        vm_replica.roll_back(planted.rep.vm, guards=planted.rep.guard)  # would write s1's blocks back into it
    with refused(f"{name} is a symbolic link"):
        _prepare(planted, "s2")
    assert copy.read_bytes() == before
    assert planted.victim.read_bytes() == VICTIM


def test_a_replica_file_linked_outside_is_never_read_for_a_restore_point(planted: Planted) -> None:
    vm_replica.roll_back(planted.rep.vm, guards=planted.rep.guard)
    planted.link(replica.DATA_FILE, planted.victim)
    with refused(f"{replica.DATA_FILE} is a symbolic link"):
        open_point_disk(planted.rep.vm, planted.p0, "d0")


def test_a_pending_rollback_file_linked_outside_is_refused_by_its_name(planted: Planted) -> None:
    folder = planted.disk / replica.ROLLBACK_DIR
    (folder / rollback.PENDING).replace(planted.outside / "undo")
    (folder / rollback.PENDING).symlink_to(planted.outside / "undo")
    before = (planted.outside / "undo").read_bytes()
    with refused(f"{rollback.PENDING} is a symbolic link"):
        vm_replica.roll_back(planted.rep.vm, guards=planted.rep.guard)
    with refused(f"{rollback.PENDING} is a symbolic link"):
        open_point_disk(planted.rep.vm, planted.p0, "d0")
    assert (planted.outside / "undo").read_bytes() == before


@pytest.mark.parametrize("name", [replica.STATE_FILE, restore_points.POINTS_FILE])
def test_a_planted_temporary_file_linked_outside_is_replaced_not_written_through(planted: Planted, name: str) -> None:
    """atomic_write writes NAME.tmp and renames it: a planted NAME.tmp link must not truncate its target."""
    at = planted.rep.vm if name == restore_points.POINTS_FILE else planted.disk
    (at / f"{name}.tmp").symlink_to(planted.victim)
    vm_replica.end_session(planted.rep.vm, "s1", keep_for_resume=False, guards=planted.rep.guard)
    planted.rep.write("s2", bytearray(planted.image), {3: bytes(range(256)) * (BS // 256)})
    restore_points.commit(
        planted.rep.vm, session_id="s2", checkpoint_id="cp-s2", disk_ids=["d0"], guard=planted.rep.guard
    )
    assert planted.outside_untouched()
    assert not (at / f"{name}.tmp").is_symlink()


def test_a_rollback_folder_linked_outside_the_root_is_refused_and_nothing_is_written_there(planted: Planted) -> None:
    vm_replica.roll_back(planted.rep.vm, guards=planted.rep.guard)
    folder = planted.disk / replica.ROLLBACK_DIR
    shutil.rmtree(folder)
    folder.symlink_to(planted.outside, target_is_directory=True)
    with refused(f"{replica.ROLLBACK_DIR} is a symbolic link"):
        _prepare(planted, "s2")  # would create the new session's pending.undo outside the root
    with refused(f"{replica.ROLLBACK_DIR} is a symbolic link"):
        vm_replica.status(planted.rep.vm, guards=planted.rep.guard)
    assert planted.outside_untouched()


def test_a_disks_folder_linked_outside_the_root_is_refused_and_nothing_is_written_there(planted: Planted) -> None:
    """The disks of a replica moved outside the root and linked back: a rollback would write them there."""
    disks = planted.rep.vm / "disks"
    moved = planted.outside / "disks"
    disks.replace(moved)
    disks.symlink_to(moved, target_is_directory=True)
    data = (moved / "d0" / replica.DATA_FILE).read_bytes()
    for call in (vm_replica.roll_back, vm_replica.status):
        with refused("disks is a symbolic link"):
            call(planted.rep.vm, guards=planted.rep.guard)
    with refused("disks is a symbolic link"):
        open_point_disk(planted.rep.vm, planted.p0, "d0")
    assert (moved / "d0" / replica.DATA_FILE).read_bytes() == data


def test_a_disk_folder_linked_to_another_replicas_disk_is_refused(planted: Planted, tmp_path: Path) -> None:
    """A disk folder of this VM linked to another VM's disk (inside the root): rolling this VM back must not
    roll the other's disk back."""
    other = Replica(tmp_path / "root2")
    image = bytearray(SIZE)
    other.write("t0", image, _random_blocks(random.Random(42), 64))
    other.commit("t0", image)
    other.write("t1", image, _random_blocks(random.Random(43), 5))
    held = other.data()
    (planted.rep.vm / "disks" / "d1").symlink_to(other.disk, target_is_directory=True)
    with refused("d1 is a symbolic link"):
        vm_replica.roll_back(planted.rep.vm, guards=planted.rep.guard)
    assert differing(other.data(), held) == []


def test_a_rollback_file_of_another_block_size_is_refused_not_misread(planted: Planted) -> None:
    """A point's rollback file whose header's block size is not the disk's: its records would land on other
    blocks (an export of wrong bytes that looks right)."""
    rng = random.Random(44)
    vm_replica.roll_back(planted.rep.vm, guards=planted.rep.guard)
    planted.rep.write("s2", bytearray(planted.image), _random_blocks(rng, 6))
    planted.rep.commit("s2", bytearray(planted.image))
    path = planted.disk / replica.ROLLBACK_DIR / f"{planted.p0}{rollback.SUFFIX}"
    good = rollback.UndoFile(path)
    header, records = good.header, []
    for block, saved in good.records():
        buf = bytearray(saved.length)
        good.read_block(saved, memoryview(buf))
        records.append((block * 2, bytes(buf[: BS // 2]) if saved.offset >= 0 else None, saved.digest))
    good.close()
    path.unlink()
    rollback.create(path, rollback.UndoHeader(header.session_id, header.base_point_id, BS // 2, header.disk_size))
    forged = rollback.UndoFile(path, writable=True)
    forged.append(records)
    forged.close()
    with refused(rf"{planted.p0}\.undo does not match.* {BS // 2}-byte blocks"):
        open_point_disk(planted.rep.vm, planted.p0, "d0")


def test_a_rollback_file_for_another_disk_size_is_refused_not_misread(planted: Planted) -> None:
    rng = random.Random(45)
    vm_replica.roll_back(planted.rep.vm, guards=planted.rep.guard)
    planted.rep.write("s2", bytearray(planted.image), _random_blocks(rng, 6))
    planted.rep.commit("s2", bytearray(planted.image))
    points = json.loads((planted.rep.vm / restore_points.POINTS_FILE).read_text())
    points["restore_points"][0]["disks"][0]["disk_size"] = 10**15  # a verification would run for ever
    (planted.rep.vm / restore_points.POINTS_FILE).write_text(json.dumps(points))
    with refused(r"\.undo does not match.*disk size 4194304, the point has .* disk size 1000000000000000"):
        open_point_disk(planted.rep.vm, planted.p0, "d0")


@pytest.mark.parametrize("content", [b"", b"\0" * 512, b'{"format": 2, "disk_size": 4'])
def test_a_torn_or_zeroed_state_file_is_refused_by_name_and_loses_nothing(planted: Planted, content: bytes) -> None:
    """A power cut on a file system without ordered data can leave state.json empty or zero-filled."""
    vm_replica.roll_back(planted.rep.vm, guards=planted.rep.guard)
    data = planted.rep.data()
    (planted.disk / replica.STATE_FILE).write_bytes(content)
    for call in (vm_replica.status, vm_replica.roll_back):
        with refused(f"d0: {replica.STATE_FILE}"):
            call(planted.rep.vm, guards=planted.rep.guard)
    with refused(f"d0: {replica.STATE_FILE}"):
        _prepare(planted, "s2")
    assert planted.rep.data() == data
    assert differing(planted.rep.data(), planted.rep.images[planted.p0]) == []


@pytest.mark.parametrize("content", [b"", b"\0" * 300, b'{"format": 2, "restore_points": [{"id": "a'])
def test_a_torn_or_zeroed_points_file_is_refused_by_name(planted: Planted, content: bytes) -> None:
    (planted.rep.vm / restore_points.POINTS_FILE).write_bytes(content)
    with refused(restore_points.POINTS_FILE):
        vm_replica.status(planted.rep.vm, guards=planted.rep.guard)
    with refused(restore_points.POINTS_FILE):
        _prepare(planted, "s2")


@pytest.mark.parametrize("factor", [2, 0.5])
def test_a_rolled_back_session_that_resized_the_disk_leaves_the_points_size_in_the_state(
    tmp_path: Path, factor: float
) -> None:
    """A session that grew (or shrank) the disk and is rolled back: the data file returns to the point's
    size, and so must the state every reader sizes the disk by (GetReplicaDisk, ReadDigests, the next
    prepare's resize)."""
    rep = Replica(tmp_path)
    image = bytearray(SIZE)
    rep.write("s0", image, _random_blocks(random.Random(46), 64))
    p0 = rep.commit("s0", image)
    size = int(SIZE * factor)
    rep.write("s1", bytearray(size), {1: b"\1" * BS, size // BS - 1: b"\2" * BS}, size=size)
    after = vm_replica.end_session(rep.vm, "s1", keep_for_resume=False, guards=rep.guard)
    assert after.state == vm_replica.AT_POINT
    assert differing(rep.data(), rep.images[p0]) == []
    st = replica.load_state(rep.disk)
    assert (st.disk_size, st.block_size) == (SIZE, BS)
    block_size, digests = replica.read_digests(rep.disk, 0, 0)
    assert (block_size, len(digests)) == (BS, SIZE // BS * 16)
    assert differing(rep.read_point(p0), rep.images[p0]) == []


def _vhdx_session(rep: Replica, session: str, blocks: dict[int, bytes], *, size: int) -> None:
    vm_replica.prepare_disk(
        rep.vm, rep.disk, guards=rep.guard, disk_size=size, block_size=BS, session_id=session,
        checkpoint_id=f"cp-{session}", replica_format="vhdx",
    )  # fmt: skip
    stream = replica.ReplicaStream(
        rep.disk, rep.guard(rep.disk), session_id=session, checkpoint_id=f"cp-{session}", disk_size=size,
        block_size=BS, pass_number=0,
    )  # fmt: skip
    try:
        for b, data in sorted(blocks.items()):
            ext = DecodedExtent(b * BS, BS, digest(data), data)
            stream.apply(DecodedBatch(b, (b + 1) * BS, False, [ext], PassDigest(), BS))
        stream.commit(stream.mark(size, final=True))
    finally:
        stream.close()


def _vhdx_image(rep: Replica, size: int) -> bytes:
    with open_reader(DiskFormat.VHDX, replica.data_file(rep.disk, "vhdx")) as r:
        buf = bytearray(r.size)
        r.read_into(memoryview(buf), 0)
    assert len(buf) == size
    return bytes(buf)


def test_a_vhdx_replica_grown_by_a_failed_session_is_rolled_back_to_the_points_size(tmp_path: Path) -> None:
    """The source disk grew, the session failed and is not resumed: the rollback must take the VHDX back to
    the point's size, not leave the replica stuck half rolled back (every later session refused)."""
    rep = Replica(tmp_path)
    rng = random.Random(47)
    first = {b: rng.randbytes(BS) for b in range(0, SIZE // BS, 3)}
    _vhdx_session(rep, "s0", first, size=SIZE)
    p0 = restore_points.commit(rep.vm, session_id="s0", checkpoint_id="cp-s0", disk_ids=["d0"], guard=rep.guard).id
    at_p0 = _vhdx_image(rep, SIZE)
    _vhdx_session(rep, "s1", {1: b"\1" * BS, 2 * SIZE // BS - 1: b"\2" * BS}, size=2 * SIZE)
    after = vm_replica.end_session(rep.vm, "s1", keep_for_resume=False, guards=rep.guard)
    assert after.state == vm_replica.AT_POINT
    assert _vhdx_image(rep, SIZE) == at_p0
    assert replica.load_state(rep.disk).disk_size == SIZE
    disk = open_point_disk(rep.vm, p0, "d0")
    try:
        buf = bytearray(disk.size)
        disk.read_into(memoryview(buf), 0)
    finally:
        disk.close()
    assert bytes(buf) == at_p0
    _vhdx_session(rep, "s2", {0: b"\3" * BS}, size=SIZE)  # the replica takes sessions again


def test_a_point_deleted_while_another_sessions_point_is_committed_loses_neither(
    rep: Replica, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retention (DeleteRestorePoint) and a commit (CommitRestorePoint) on the same replica at once: each
    reads, changes and saves restore-points.json, so they must not interleave (restore_points.vm_lock). A
    delete that saved the list it read before the commit would drop the new point: the replica file (the new
    point's data) would then be read as the older point."""
    rng = random.Random(48)
    image = bytearray(SIZE)
    ids = []
    for i in range(3):
        rep.write(f"s{i}", image, _random_blocks(rng, 64 if i == 0 else 8))
        ids.append(rep.commit(f"s{i}", image))
    rep.write("s3", image, _random_blocks(rng, 8))
    committed: list[str] = []
    real_fold = rollback.fold

    def fold_meanwhile(folder: Path, *, newer: str, older: str) -> None:
        other = threading.Thread(target=lambda: committed.append(rep.commit("s3", image)))
        other.start()
        other.join(timeout=1.0)  # the commit runs now unless the delete holds the replica
        real_fold(folder, newer=newer, older=older)
        threads.append(other)

    threads: list[threading.Thread] = []
    monkeypatch.setattr(restore_points, "fold", fold_meanwhile)
    restore_points.delete(rep.vm, ids[1], guard=rep.guard)
    for t in threads:
        t.join(timeout=30)
    assert [p.id for p in restore_points.list_points(rep.vm)] == [ids[0], ids[2], *committed]
    for p in (ids[0], ids[2], *committed):
        assert differing(rep.read_point(p), rep.images[p]) == []


def test_a_newest_point_whose_size_is_not_the_replicas_is_refused(planted: Planted) -> None:
    vm_replica.roll_back(planted.rep.vm, guards=planted.rep.guard)
    points = json.loads((planted.rep.vm / restore_points.POINTS_FILE).read_text())
    points["restore_points"][-1]["disks"][0]["disk_size"] = 10**15  # a verification would run for ever
    (planted.rep.vm / restore_points.POINTS_FILE).write_text(json.dumps(points))
    with refused(r"says disk d0 has 1000000000000000 bytes, the replica disk 4194304"):
        open_point_disk(planted.rep.vm, "", "d0")


@pytest.mark.parametrize("twice", ["point", "disk"])
def test_a_points_file_naming_a_point_or_a_disk_twice_is_refused_before_anything_is_removed(
    planted: Planted, twice: str
) -> None:
    rng = random.Random(49)
    vm_replica.roll_back(planted.rep.vm, guards=planted.rep.guard)
    planted.rep.write("s2", bytearray(planted.image), _random_blocks(rng, 6))
    planted.rep.commit("s2", bytearray(planted.image))
    path = planted.rep.vm / restore_points.POINTS_FILE
    doc = json.loads(path.read_text())
    first = doc["restore_points"][0]
    if twice == "point":
        doc["restore_points"].insert(1, dict(first, session_id="forged"))
    else:
        first["disks"].append(first["disks"][0])
    path.write_text(json.dumps(doc))
    undo = planted.disk / replica.ROLLBACK_DIR / f"{planted.p0}{rollback.SUFFIX}"
    with refused("lists a restore point id twice" if twice == "point" else "lists a disk twice"):
        restore_points.delete(planted.rep.vm, planted.p0, guard=planted.rep.guard)
    assert undo.exists()


def _returns_within(seconds: float, call: Callable[[], object], fifo: Path) -> BaseException | None:
    """Run `call` in a thread; it must end (raising or not) within `seconds`. A call blocked opening the FIFO
    is released afterwards (a writer opens and closes it) so the test leaves no thread behind."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout=seconds)
    hung = t.is_alive()
    while t.is_alive():
        with contextlib.suppress(OSError):  # ENXIO until the reader is inside its open
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        t.join(timeout=0.05)
    assert not hung, f"the call hung on the FIFO at {fifo.name}"
    return outcome[0]


@pytest.mark.parametrize(
    "name",
    [restore_points.POINTS_FILE, replica.STATE_FILE, f"{replica.ROLLBACK_DIR}/{rollback.PENDING}", replica.DATA_FILE],
)
def test_a_fifo_planted_in_place_of_a_file_is_refused_not_waited_on(planted: Planted, name: str) -> None:
    """A read-only open of a FIFO waits for a writer: one planted as the points file would have every call on
    the replica hang in a worker thread under the VM's lock, until the agent's threads are all used up."""
    at = planted.rep.vm / name if name == restore_points.POINTS_FILE else planted.disk / name
    at.unlink()
    os.mkfifo(at)
    error = _returns_within(5, lambda: open_point_disk(planted.rep.vm, planted.p0, "d0"), at)
    assert isinstance(error, VmreplError) and error.grpc_code == "FAILED_PRECONDITION", error
    assert "not a regular file" in str(error) and at.name in str(error), error


def test_a_lost_pending_rollback_file_stops_the_session_before_it_overwrites_the_point(planted: Planted) -> None:
    """pending.undo removed by hand (a clean-up of "pending" files) under a session that writes over the
    newest point: the stream must not overwrite the point's blocks with nothing saved, and a rollback must
    not call the replica "at the point" when it cannot restore it."""
    before = planted.rep.data()
    (planted.disk / replica.ROLLBACK_DIR / rollback.PENDING).unlink()
    with refused(r"rollback/pending\.undo is missing, yet session s1 writes over restore point"):
        replica.ReplicaStream(
            planted.disk, planted.rep.guard(planted.disk), session_id="s1", checkpoint_id="cp-s1",
            disk_size=SIZE, block_size=BS, pass_number=0,
        )  # fmt: skip
    with refused(r"pending\.undo is missing"):
        vm_replica.end_session(planted.rep.vm, "s1", keep_for_resume=False, guards=planted.rep.guard)
    assert planted.rep.data() == before


@pytest.mark.parametrize(("key", "value"), [("block_size", 1), ("block_size", 3 * BS), ("disk_size", 1 << 60)])
def test_a_state_with_a_size_no_prepare_accepts_is_refused(planted: Planted, key: str, value: int) -> None:
    """block_size 1 would size the digest file at 16 bytes per byte of disk; 2**60 bytes is past any disk."""
    vm_replica.roll_back(planted.rep.vm, guards=planted.rep.guard)
    path = planted.disk / replica.STATE_FILE
    doc = json.loads(path.read_text())
    doc[key] = value
    path.write_text(json.dumps(doc))
    with refused(rf"d0: {replica.STATE_FILE}: {key} is {value}, out of range"):
        vm_replica.status(planted.rep.vm, guards=planted.rep.guard)


@pytest.mark.parametrize(("key", "value"), [("disk_size", 1 << 60), ("block_size", 7), ("block_size", True)])
def test_a_points_file_with_sizes_no_disk_has_is_refused(planted: Planted, key: str, value: int) -> None:
    path = planted.rep.vm / restore_points.POINTS_FILE
    doc = json.loads(path.read_text())
    doc["restore_points"][0]["disks"][0][key] = value
    path.write_text(json.dumps(doc))
    with refused(f"{restore_points.POINTS_FILE} .*{key}"):
        vm_replica.status(planted.rep.vm, guards=planted.rep.guard)


@pytest.mark.parametrize(("key", "value"), [("block_size", 1 << 40), ("block_size", True), ("disk_size", -1)])
def test_a_rollback_header_with_sizes_no_disk_has_is_refused_before_any_block_is_written_back(
    planted: Planted, key: str, value: int
) -> None:
    """A planted pending.undo claiming 2**40-byte blocks: the rollback would allocate a 1 TiB buffer."""
    path = planted.disk / replica.ROLLBACK_DIR / rollback.PENDING
    undo = rollback.UndoFile(path)
    h = undo.header
    header = (
        dataclasses.replace(h, block_size=value) if key == "block_size" else dataclasses.replace(h, disk_size=value)
    )
    undo.close()
    path.write_bytes(header.encode())
    data = planted.rep.data()
    with refused(r"pending\.undo: the header's sizes are not sizes"):
        vm_replica.roll_back(planted.rep.vm, guards=planted.rep.guard)
    assert planted.rep.data() == data


def test_many_ends_rollbacks_prepares_and_streams_at_once_leave_the_replica_at_its_newest_point(rep: Replica) -> None:
    """A flood of EndReplicaSession, RollbackReplica, GetReplica and new sessions' prepares and writes on one
    replica, from many threads: the VM lock and the disk guard serialise them; whatever interleaving, once
    the last session is rolled back the replica is its newest point, byte for byte, and every point reads
    back right."""
    rng = random.Random(50)
    image = bytearray(SIZE)
    rep.write("s0", image, _random_blocks(rng, 64))
    p0 = rep.commit("s0", image)
    rep.write("s1", image, _random_blocks(rng, 8))
    p1 = rep.commit("s1", image)
    errors: list[BaseException] = []

    def session(n: int) -> None:
        name = f"w{n}"
        # Another thread's prepare or rollback may take the disk over: refused or cancelled, never wrong.
        with contextlib.suppress(VmreplError):
            rep.write(name, bytearray(image), _random_blocks(random.Random(n), 6))
        for keep in (True, False):
            with contextlib.suppress(VmreplError):  # nothing of the session left to end
                vm_replica.end_session(rep.vm, name, keep_for_resume=keep, guards=rep.guard)

    def churn(n: int) -> None:
        for _ in range(5):
            vm_replica.roll_back(rep.vm, guards=rep.guard)
            vm_replica.status(rep.vm, guards=rep.guard)

    def run(fn: Callable[[int], None], n: int) -> None:
        try:
            fn(n)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(session if n % 2 else churn, n)) for n in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=50)
    assert not any(t.is_alive() for t in threads) and errors == []
    after = vm_replica.roll_back(rep.vm, guards=rep.guard)
    assert (after.state, after.base_point_id) == (vm_replica.AT_POINT, p1)
    assert differing(rep.data(), rep.images[p1]) == []
    assert [differing(rep.read_point(p), rep.images[p]) for p in (p0, p1)] == [[], []]


@pytest.mark.parametrize("size", [1000, 64 * 1024**4 + 512])
def test_a_vhdx_prepare_of_a_size_vhdx_cannot_hold_is_refused_before_anything_changes(
    tmp_path: Path, size: int
) -> None:
    """The disk size is checked against the replica format before the prepare rolls other disks back or
    creates any file: a bad request changes nothing."""
    rep = Replica(tmp_path)
    image = bytearray(SIZE)
    rep.write("s0", image, _random_blocks(random.Random(51), 64))
    rep.commit("s0", image)
    rep.write("s1", bytearray(image), _random_blocks(random.Random(52), 5))
    held = rep.data()
    d1 = rep.vm / "disks" / "d1"
    with pytest.raises(InvalidArgument, match="disk_size"):
        vm_replica.prepare_disk(
            rep.vm, d1, guards=rep.guard, disk_size=size, block_size=BS, session_id="s2", checkpoint_id="cp-s2",
            replica_format="vhdx",
        )  # fmt: skip
    assert rep.data() == held and replica.load_state(rep.disk).session_id == "s1"
    assert not d1.exists()


def test_a_points_rollback_file_linked_outside_is_neither_read_nor_measured(planted: Planted) -> None:
    rng = random.Random(53)
    vm_replica.roll_back(planted.rep.vm, guards=planted.rep.guard)
    planted.rep.write("s2", bytearray(planted.image), _random_blocks(rng, 6))
    planted.rep.commit("s2", bytearray(planted.image))
    undo = planted.disk / replica.ROLLBACK_DIR / f"{planted.p0}{rollback.SUFFIX}"
    undo.replace(planted.outside / "moved.undo")
    undo.symlink_to(planted.outside / "moved.undo")
    with refused(rf"{planted.p0}\.undo is a symbolic link"):
        open_point_disk(planted.rep.vm, planted.p0, "d0")
    view = vm_replica.status(planted.rep.vm, guards=planted.rep.guard).points[0]
    assert view.point.id == planted.p0
    assert (view.restorable, view.rollback_bytes) == (False, {})  # the outside file's size is not told
