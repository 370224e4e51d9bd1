"""Restore points with data: every point a replica lists can be read back exactly; a session that will not be
resumed is rolled back exactly; retention drops points without rewriting the replica (in-process, the
target's own code on real files)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from target_agent import replica, restore_points, rollback, vm_replica
from target_agent.points import open_point_disk
from target_agent.replica import DiskGuard
from vmrepl.batch import DecodedBatch, DecodedExtent, PassDigest
from vmrepl.block import DIGEST_SIZE, UNKNOWN_DIGEST, digest
from vmrepl.errors import FailedPrecondition
from vmrepl.extent import MiB

BS = 64 * 1024
SIZE = 64 * BS


class Replica:
    """One VM replica with one disk, and the images its points must read back as."""

    def __init__(self, root: Path) -> None:
        self.vm = root / "vm"
        self.disk = self.vm / "disks" / "d0"
        self._guards: dict[Path, DiskGuard] = {}
        self.images: dict[str, bytes] = {}  # point id -> the disk's bytes at that point

    def guard(self, disk_dir: Path) -> DiskGuard:
        return self._guards.setdefault(disk_dir, DiskGuard())

    def write(self, session: str, image: bytearray, blocks: dict[int, bytes | None], *, size: int = SIZE) -> None:
        """A session writes `blocks` (None: a zero block) and reaches the end of the disk, uncommitted."""
        vm_replica.prepare_disk(
            self.vm, self.disk, guards=self.guard, disk_size=size, block_size=BS, session_id=session,
            checkpoint_id=f"cp-{session}",
        )  # fmt: skip
        stream = replica.ReplicaStream(
            self.disk, self.guard(self.disk), session_id=session, checkpoint_id=f"cp-{session}", disk_size=size,
            block_size=BS, pass_number=0,
        )  # fmt: skip
        try:
            for b, data in sorted(blocks.items()):
                block = bytes(BS) if data is None else data
                image[b * BS : (b + 1) * BS] = block
                ext = DecodedExtent(b * BS, BS, b"" if data is None else digest(data), data)
                stream.apply(DecodedBatch(b, (b + 1) * BS, False, [ext], PassDigest(), len(block)))
            stream.commit(stream.mark(size, final=True))
        finally:
            stream.close()

    def commit(self, session: str, image: bytearray) -> str:
        p = restore_points.commit(
            self.vm, session_id=session, checkpoint_id=f"cp-{session}", disk_ids=["d0"], guard=self.guard,
            change_reference=f"rct-{session}", consistency="crash",
        )  # fmt: skip
        self.images[p.id] = bytes(image)
        return p.id

    def read_point(self, point_id: str) -> bytes:
        disk = open_point_disk(self.vm, point_id, "d0")
        try:
            buf = bytearray(disk.size)
            disk.read_into(memoryview(buf), 0)
            digests = disk.digests(0, disk.blocks)
        finally:
            disk.close()
        for b in range(len(buf) // BS):
            known = digests[b * DIGEST_SIZE : (b + 1) * DIGEST_SIZE]
            assert known in (UNKNOWN_DIGEST, digest(bytes(buf[b * BS : (b + 1) * BS]))), f"block {b}'s digest"
        return bytes(buf)

    def data(self) -> bytes:
        return (self.disk / replica.DATA_FILE).read_bytes()


def differing(a: bytes, b: bytes) -> list[int]:
    """The blocks where two images differ (a length mismatch counts as block -1): assertions name blocks, not
    megabytes of bytes (pytest's diff of two 4 MiB values takes minutes)."""
    if len(a) != len(b):
        return [-1]
    return [i for i in range(0, -(-len(a) // BS)) if a[i * BS : (i + 1) * BS] != b[i * BS : (i + 1) * BS]]


def _random_blocks(rng: random.Random, n: int) -> dict[int, bytes | None]:
    out: dict[int, bytes | None] = {}
    for b in rng.sample(range(SIZE // BS), n):
        out[b] = None if rng.random() < 0.2 else rng.randbytes(BS)
    return out


@pytest.fixture
def rep(tmp_path: Path) -> Replica:
    return Replica(tmp_path)


def test_every_point_reads_back_exactly_and_the_newest_is_the_replica_file(rep: Replica) -> None:
    rng = random.Random(1)
    image = bytearray(SIZE)
    ids = []
    for i in range(4):
        rep.write(f"s{i}", image, _random_blocks(rng, 64 if i == 0 else 9))
        ids.append(rep.commit(f"s{i}", image))
    assert differing(rep.data(), bytes(image)) == []  # failover to the newest point: the file as it is
    for point_id in ids:
        assert differing(rep.read_point(point_id), rep.images[point_id]) == []
    status = vm_replica.status(rep.vm, guards=rep.guard)
    assert status.state == vm_replica.AT_POINT and status.base_point_id == ids[-1]
    assert all(v.restorable for v in status.points)
    assert [v.point.change_reference for v in status.points] == ["rct-s0", "rct-s1", "rct-s2", "rct-s3"]


def test_a_first_full_saves_nothing(rep: Replica) -> None:
    image = bytearray(SIZE)
    rep.write("s0", image, _random_blocks(random.Random(2), 64))
    assert not (rep.disk / replica.ROLLBACK_DIR / rollback.PENDING).exists()
    rep.commit("s0", image)
    assert os.listdir(rep.disk / replica.ROLLBACK_DIR) == []


def test_a_failed_session_not_resumed_is_rolled_back_exactly(rep: Replica) -> None:
    rng = random.Random(3)
    image = bytearray(SIZE)
    rep.write("s0", image, _random_blocks(rng, 64))
    p0 = rep.commit("s0", image)
    scratch = bytearray(image)
    rep.write("s1", scratch, _random_blocks(rng, 20))
    assert vm_replica.status(rep.vm, guards=rep.guard).state == vm_replica.WRITING
    after = vm_replica.end_session(rep.vm, "s1", keep_for_resume=False, guards=rep.guard)
    assert (after.state, after.rolled_back_session) == (vm_replica.AT_POINT, "s1")
    assert differing(rep.data(), rep.images[p0]) == []
    assert differing(rep.read_point(p0), rep.images[p0]) == []
    # The digests are the point's again: a digest comparison sends exactly what the next session changed.
    _, raw = replica.read_digests(rep.disk, 0, 0)
    assert raw == b"".join(digest(rep.images[p0][b * BS : (b + 1) * BS]) for b in range(SIZE // BS))
    # Idempotent: a controller asking again after a lost answer gets the same state.
    assert vm_replica.end_session(rep.vm, "s1", keep_for_resume=False, guards=rep.guard).state == vm_replica.AT_POINT


def test_a_session_kept_for_resume_keeps_its_progress_and_any_other_session_rolls_it_back(rep: Replica) -> None:
    rng = random.Random(4)
    image = bytearray(SIZE)
    rep.write("s0", image, _random_blocks(rng, 64))
    p0 = rep.commit("s0", image)
    scratch = bytearray(image)
    rep.write("s1", scratch, _random_blocks(rng, 10))
    kept = vm_replica.end_session(rep.vm, "s1", keep_for_resume=True, guards=rep.guard)
    assert (kept.state, kept.session_id) == (vm_replica.RESUMABLE, "s1")
    st = vm_replica.prepare_disk(
        rep.vm, rep.disk, guards=rep.guard, disk_size=SIZE, block_size=BS, session_id="s2",
        checkpoint_id="cp-s1", resume_session_id="s1",
    )  # fmt: skip
    assert (st.state, st.committed_offset) == (replica.COMPLETE, SIZE)  # the continuing session keeps it all
    # A session that does not continue it returns the replica to the point first.
    vm_replica.prepare_disk(
        rep.vm, rep.disk, guards=rep.guard, disk_size=SIZE, block_size=BS, session_id="s3", checkpoint_id="cp-s3"
    )
    assert differing(rep.data(), rep.images[p0]) == []


def test_a_crash_during_a_rollback_is_finished_by_the_next_one(rep: Replica) -> None:
    rng = random.Random(5)
    image = bytearray(SIZE)
    rep.write("s0", image, _random_blocks(rng, 64))
    p0 = rep.commit("s0", image)
    rep.write("s1", bytearray(image), _random_blocks(rng, 20))
    # Half the saved blocks were written back when the process died.
    undo = rollback.UndoFile(rep.disk / replica.ROLLBACK_DIR / rollback.PENDING)
    with open(rep.disk / replica.DATA_FILE, "r+b") as f:
        for block, saved in list(undo.records())[:10]:
            buf = bytearray(BS)
            undo.read_block(saved, memoryview(buf))
            f.seek(block * BS)
            f.write(buf)
    undo.close()
    vm_replica.roll_back(rep.vm, guards=rep.guard)
    assert differing(rep.data(), rep.images[p0]) == []


def test_retention_drops_the_oldest_without_touching_the_replica(rep: Replica) -> None:
    rng = random.Random(6)
    image = bytearray(SIZE)
    ids = []
    for i in range(3):
        rep.write(f"s{i}", image, _random_blocks(rng, 64 if i == 0 else 12))
        ids.append(rep.commit(f"s{i}", image))
    before = (rep.disk / replica.DATA_FILE).stat()
    restore_points.delete(rep.vm, ids[0], guard=rep.guard)
    after = (rep.disk / replica.DATA_FILE).stat()
    assert (before.st_mtime_ns, before.st_ino) == (after.st_mtime_ns, after.st_ino)
    assert not (rep.disk / replica.ROLLBACK_DIR / f"{ids[0]}.undo").exists()
    assert [differing(rep.read_point(p), rep.images[p]) for p in ids[1:]] == [[], []]


def test_deleting_a_point_between_others_folds_its_rollback_data(rep: Replica) -> None:
    rng = random.Random(7)
    image = bytearray(SIZE)
    ids = []
    for i in range(4):
        rep.write(f"s{i}", image, _random_blocks(rng, 64 if i == 0 else 16))
        ids.append(rep.commit(f"s{i}", image))
    restore_points.delete(rep.vm, ids[2], guard=rep.guard)
    for p in (ids[0], ids[1], ids[3]):
        assert differing(rep.read_point(p), rep.images[p]) == []
    with pytest.raises(FailedPrecondition, match="newest"):
        restore_points.delete(rep.vm, ids[3], guard=rep.guard)


def test_a_point_is_read_right_while_a_session_overwrites_it(rep: Replica) -> None:
    rng = random.Random(8)
    image = bytearray(SIZE)
    rep.write("s0", image, _random_blocks(rng, 64))
    p0 = rep.commit("s0", image)
    disk = open_point_disk(rep.vm, p0, "d0")  # opened before the session begins
    try:
        rep.write("s1", bytearray(image), _random_blocks(rng, 30))
        buf = bytearray(SIZE)
        disk.read_into(memoryview(buf), 0)
    finally:
        disk.close()
    assert differing(bytes(buf), rep.images[p0]) == []
    assert differing(rep.read_point(p0), rep.images[p0]) == []  # and opened while the replica is between points


def test_a_torn_rollback_tail_keeps_the_valid_records(rep: Replica) -> None:
    rng = random.Random(9)
    image = bytearray(SIZE)
    rep.write("s0", image, _random_blocks(rng, 64))
    rep.commit("s0", image)
    rep.write("s1", bytearray(image), _random_blocks(rng, 8))
    path = rep.disk / replica.ROLLBACK_DIR / rollback.PENDING
    whole = rollback.UndoFile(path)
    n = len(whole.index)
    whole.close()
    with open(path, "r+b") as f:  # a power cut tore the last record's bytes
        f.truncate(path.stat().st_size - 10)
    torn = rollback.UndoFile(path, writable=True)
    assert len(torn.index) == n - 1 and path.stat().st_size == torn.end
    torn.close()


def test_a_disk_that_shrinks_and_grows_between_points_reads_back_at_each_size(rep: Replica) -> None:
    rng = random.Random(10)
    image = bytearray(SIZE)
    rep.write("s0", image, _random_blocks(rng, 64))
    p0 = rep.commit("s0", image)
    small = bytearray(image[: SIZE // 2])
    rep.write("s1", small, {1: rng.randbytes(BS)}, size=SIZE // 2)
    p1 = rep.commit("s1", small)
    big = bytearray(small) + bytearray(SIZE)
    rep.write("s2", big, {40: rng.randbytes(BS), 90: rng.randbytes(BS)}, size=SIZE + SIZE // 2)
    p2 = rep.commit("s2", big)
    for p in (p0, p1, p2):
        assert differing(rep.read_point(p), rep.images[p]) == []


def test_a_block_size_change_under_restore_points_is_refused_with_a_clear_error(rep: Replica) -> None:
    image = bytearray(SIZE)
    rep.write("s0", image, _random_blocks(random.Random(11), 64))
    rep.commit("s0", image)
    with pytest.raises(FailedPrecondition, match="block size change"):
        vm_replica.prepare_disk(
            rep.vm, rep.disk, guards=rep.guard, disk_size=SIZE, block_size=MiB, session_id="s1", checkpoint_id="c"
        )


def test_a_planted_point_id_that_is_a_path_is_refused_before_any_file_is_touched(rep: Replica) -> None:
    image = bytearray(SIZE)
    rep.write("s0", image, _random_blocks(random.Random(12), 64))
    rep.commit("s0", image)
    doc = json.loads((rep.vm / restore_points.POINTS_FILE).read_text())
    doc["restore_points"][0]["id"] = "../../../victim"
    (rep.vm / restore_points.POINTS_FILE).write_text(json.dumps(doc))
    (rep.vm.parent / "victim.undo").write_bytes(b"precious")
    with pytest.raises(FailedPrecondition, match="not a plain name"):
        restore_points.delete(rep.vm, "../../../victim", guard=rep.guard)
    assert (rep.vm.parent / "victim.undo").read_bytes() == b"precious"


def test_a_planted_or_foreign_rollback_file_is_refused_with_its_name(rep: Replica) -> None:
    image = bytearray(SIZE)
    rep.write("s0", image, _random_blocks(random.Random(13), 64))
    rep.commit("s0", image)
    rep.write("s1", bytearray(image), _random_blocks(random.Random(14), 4))
    pending = rep.disk / replica.ROLLBACK_DIR / rollback.PENDING
    pending.write_bytes(b"not an undo file" * 300)
    with pytest.raises(FailedPrecondition, match=r"pending\.undo is not a vmrepl rollback file"):
        vm_replica.roll_back(rep.vm, guards=rep.guard)
    header = rollback.UndoHeader("s1", "../escape", BS, SIZE)
    pending.write_bytes(header.encode())
    with pytest.raises(FailedPrecondition, match="base_point_id"):
        vm_replica.roll_back(rep.vm, guards=rep.guard)


def test_a_disk_restarting_under_a_held_checkpoint_leaves_the_vms_done_disk_as_it_is(tmp_path: Path) -> None:
    """Session s2 continues s1's held checkpoint: d0 completed in s1 and is kept (the controller counts it
    done and sends nothing), d1 failed in s1 and restarts without naming s1 — its prepare must not roll d0
    back."""
    rep = Replica(tmp_path)
    d1 = rep.vm / "disks" / "d1"
    image = bytearray(SIZE)
    rep.write("s0", image, _random_blocks(random.Random(15), 64))
    p0 = rep.commit("s0", image)
    written = bytearray(image)
    rep.write("s1", written, _random_blocks(random.Random(16), 6))
    (rep.disk / replica.STATE_FILE).replace(rep.disk / "s1-state.json")  # keep s1's state of d0 aside
    vm_replica.prepare_disk(
        rep.vm, d1, guards=rep.guard, disk_size=SIZE, block_size=BS, session_id="s1", checkpoint_id="cp-s1"
    )
    (rep.disk / "s1-state.json").replace(rep.disk / replica.STATE_FILE)
    vm_replica.prepare_disk(
        rep.vm, d1, guards=rep.guard, disk_size=SIZE, block_size=BS, session_id="s2", checkpoint_id="cp-s1"
    )
    assert differing(rep.data(), bytes(written)) == []
    assert differing(rep.data(), rep.images[p0]) != []
    # A session from another checkpoint that does not continue s1 rolls d0 back.
    vm_replica.prepare_disk(
        rep.vm, d1, guards=rep.guard, disk_size=SIZE, block_size=BS, session_id="s3", checkpoint_id="cp-s3"
    )
    assert differing(rep.data(), rep.images[p0]) == []


def test_a_session_rolled_back_cannot_be_continued(rep: Replica) -> None:
    """A held checkpoint's session rolled back on request: a later session naming it as the one it continues
    is refused, not started quietly at offset 0 (a disk the controller counts as done would send nothing)."""
    image = bytearray(SIZE)
    rep.write("s0", image, _random_blocks(random.Random(17), 64))
    rep.commit("s0", image)
    rep.write("s1", bytearray(image), _random_blocks(random.Random(18), 6))
    vm_replica.end_session(rep.vm, "s1", keep_for_resume=True, guards=rep.guard)
    vm_replica.roll_back(rep.vm, guards=rep.guard)
    with pytest.raises(FailedPrecondition, match="rolled back"):
        vm_replica.prepare_disk(
            rep.vm, rep.disk, guards=rep.guard, disk_size=SIZE, block_size=BS, session_id="s2",
            checkpoint_id="cp-s1", resume_session_id="s1",
        )  # fmt: skip


def _continue(rep: Replica, session: str, resumed: str, image: bytearray, blocks: dict[int, bytes]) -> str:
    """`session` continues `resumed`'s stopped transfer (same checkpoint), writes `blocks`, and commits."""
    checkpoint = f"cp-{resumed}"
    vm_replica.prepare_disk(
        rep.vm, rep.disk, guards=rep.guard, disk_size=SIZE, block_size=BS, session_id=session,
        checkpoint_id=checkpoint, resume_session_id=resumed,
    )  # fmt: skip
    stream = replica.ReplicaStream(
        rep.disk, rep.guard(rep.disk), session_id=session, checkpoint_id=checkpoint, disk_size=SIZE,
        block_size=BS, pass_number=0,
    )  # fmt: skip
    try:
        for b, data in sorted(blocks.items()):
            image[b * BS : (b + 1) * BS] = data
            ext = DecodedExtent(b * BS, BS, digest(data), data)
            stream.apply(DecodedBatch(b, (b + 1) * BS, False, [ext], PassDigest(), BS))
        stream.commit(stream.mark(SIZE, final=True))
    finally:
        stream.close()
    p = restore_points.commit(
        rep.vm, session_id=session, checkpoint_id=checkpoint, disk_ids=["d0"], guard=rep.guard,
        change_reference=f"rct-{session}", consistency="crash",
    )  # fmt: skip
    rep.images[p.id] = bytes(image)
    return p.id


def test_a_point_committed_by_a_resumed_session_keeps_the_previous_point_and_its_own(rep: Replica) -> None:
    """vmrepl job stop mid-session, job start (a new session continues the same checkpoint), then one more
    session: every point stays restorable and reads back as it was."""
    rng = random.Random(11)
    image = bytearray(SIZE)
    rep.write("s0", image, _random_blocks(rng, 64))
    p0 = rep.commit("s0", image)
    first = {b: rng.randbytes(BS) for b in range(0, 8)}
    rep.write("s1", bytearray(image), dict[int, bytes | None](first))  # stopped before its restore point...
    vm_replica.end_session(rep.vm, "s1", keep_for_resume=True, guards=rep.guard)
    p1 = _continue(rep, "s2", "s1", image, first | {b: rng.randbytes(BS) for b in range(8, 16)})  # ...resumed
    status = vm_replica.status(rep.vm, guards=rep.guard)
    assert [v.restorable for v in status.points] == [True, True]
    assert not (rep.disk / replica.ROLLBACK_DIR / rollback.PENDING).exists()
    assert differing(rep.read_point(p0), rep.images[p0]) == []
    assert differing(rep.read_point(p1), rep.images[p1]) == []  # the newest point, as a failover reads it
    rep.write("s3", image, {b: rng.randbytes(BS) for b in range(40, 42)})
    assert differing(rep.data(), bytes(image)) == []  # the next session never reverts p1's blocks
    p3 = rep.commit("s3", image)
    for point_id in (p0, p1, p3):
        assert differing(rep.read_point(point_id), rep.images[point_id]) == []
