"""Reading a replica disk as it was at a restore point: for verification, export and failover.

`open_point_disk` is the one way in: a `PointDisk` is a `DiskReader` (size, allocated extents,
positional reads) plus the point's block digests, whatever the replica's state and format.
"""

from __future__ import annotations

import os
from pathlib import Path

from target_agent import replica, restore_points, rollback
from target_agent.replica import DIGESTS_FILE, DigestStore
from vmrepl.block import DIGEST_SIZE, fill_zero
from vmrepl.disk.base import DiskReader, open_reader
from vmrepl.domain import DiskFormat
from vmrepl.errors import DiskError, FailedPrecondition, NotFound
from vmrepl.extent import Extent, merge


class PointDisk(DiskReader):
    """One disk of one restore point, read-only: the replica file overlaid with the rollback files from the
    point on (the point's own first: for a block several saved, the oldest saved bytes are the point's).

    Safe while a session writes the disk: a session appends a block's old bytes to the pending rollback file
    (durably) before it overwrites the block, so every read takes the replica's bytes first and then looks
    for newly saved blocks; a block overwritten meanwhile is found there. A pending file that replaced the
    one seen (a rollback, then another session) is added to the overlay too."""

    def __init__(
        self,
        disk_dir: Path,
        st: replica.DiskState,
        *,
        size: int,
        chain: list[tuple[str, int]],
        point_sessions: frozenset[str],
    ) -> None:
        """`chain`: (point id, the disk's size at it) of each point whose rollback data the read overlays."""
        self.block_size = st.block_size
        self._size = size
        self._dir = disk_dir / replica.ROLLBACK_DIR
        self._sessions = point_sessions
        self._undo: list[rollback.UndoFile] = []
        self._pending: set[int] = set()  # inode numbers of the pending files looked at
        try:
            for point_id, point_size in chain:
                self._undo.append(_chain_file(self._dir, point_id, point_sessions))
                _check_header(self._undo[-1], point_id=point_id, disk_size=point_size, block_size=st.block_size)
            self._pending.update(os.fstat(u.fileno()).st_ino for u in self._undo)
            data = replica.data_file(disk_dir, st.replica_format)
            self._data = open_reader(DiskFormat(st.replica_format), data, follow_links=False)
            self._digests = DigestStore(
                disk_dir / DIGESTS_FILE,
                block_size=st.block_size,
                disk_size=st.disk_size,
                digests_format=st.digests_format,
            )
        except BaseException:
            self.close()
            raise
        self._look_for_pending()

    @property
    def size(self) -> int:
        return self._size

    @property
    def blocks(self) -> int:
        return -(-self._size // self.block_size)

    def allocated_extents(self) -> list[Extent]:
        self._look_for_pending()
        saved = [Extent(b * self.block_size, s.length) for u in self._undo for b, s in u.index.items() if s.offset >= 0]
        inside = [e for e in self._data.allocated_extents() + saved if e.offset < self._size]
        return merge([Extent(e.offset, min(e.end, self._size) - e.offset) for e in inside])

    def read_into(self, buf: memoryview, offset: int) -> None:
        if offset + len(buf) > self._size:
            raise DiskError(f"read past the end of the point's disk ({offset + len(buf)} > {self._size})")
        n = min(len(buf), max(0, self._data.size - offset))
        if n:
            self._data.read_into(buf[:n], offset)
        fill_zero(buf[n:])
        self._look_for_pending()  # after the read: a block overwritten under it was saved before
        bs = self.block_size
        for block in range(offset // bs, -(-(offset + len(buf)) // bs)):
            saved = self._saved(block)
            if saved is None:
                continue
            undo, s = saved
            whole = bytearray(bs)
            undo.read_block(s, memoryview(whole))
            lo, hi = max(offset, block * bs), min(offset + len(buf), (block + 1) * bs)
            buf[lo - offset : hi - offset] = whole[lo - block * bs : hi - block * bs]

    def digests(self, first: int, count: int) -> bytes:
        """The point's digests of blocks [first, first+count): 16 bytes each, all zero = unknown."""
        count = max(0, min(count, self.blocks - first))
        out = bytearray(self._digests.read(first, count))
        self._look_for_pending()
        for block in range(first, first + count):
            saved = self._saved(block)
            if saved is not None:
                at = (block - first) * DIGEST_SIZE
                out[at : at + DIGEST_SIZE] = saved[1].digest
        return bytes(out)

    def saved_blocks(self) -> list[int]:
        """The blocks inside the point's disk whose bytes the overlay takes from rollback data (the point's
        chain and any pending file seen so far): where the replica's bytes may differ from the point's.
        Every other block reads as the replica file holds it."""
        self._look_for_pending()
        return sorted({b for u in self._undo for b in u.index if b < self.blocks})

    def _saved(self, block: int) -> tuple[rollback.UndoFile, rollback.Saved] | None:
        for undo in self._undo:
            s = undo.index.get(block)
            if s is not None:
                return undo, s
        return None

    def _look_for_pending(self) -> None:
        for undo in self._undo:
            undo.refresh()
        path = self._dir / rollback.PENDING
        try:
            inode = path.stat().st_ino
        except FileNotFoundError:
            return
        if inode not in self._pending:
            self._pending.add(inode)
            pending = _open_existing(path)
            if pending is None:
                return  # committed or rolled back between the look and the open: its bytes are the replica's
            if replica.committed_pending(self._dir.parent, pending.header, self._sessions):
                pending.close()  # a committed point's rollback data not yet renamed (a crash cut the commit short)
                return
            self._undo.append(pending)

    def close(self) -> None:
        for undo in self._undo:
            undo.close()
        for f in ("_data", "_digests"):
            if hasattr(self, f):
                getattr(self, f).close()


def _chain_file(folder: Path, point_id: str, sessions: frozenset[str]) -> rollback.UndoFile:
    """The rollback file of `point_id`: `<id>.undo`, or the pending file a crash left unrenamed after the
    next point's commit (its session made a point and it goes back to `point_id`); the next call that
    settles the disk renames it, and an open descriptor reads on across the rename."""
    named = folder / f"{point_id}{rollback.SUFFIX}"
    for _ in range(2):
        found = _open_existing(named)
        if found is not None:
            return found
        pending = _open_existing(folder / rollback.PENDING)
        if pending is None:
            continue  # renamed between the two looks: the named file is there now
        if pending.header.base_point_id == point_id and replica.committed_pending(
            folder.parent, pending.header, sessions
        ):
            return pending
        pending.close()
        break
    raise FailedPrecondition(
        f"restore point {point_id}'s rollback data is missing on disk {folder.parent.name} (a point from before "
        "rollback data, or files removed by hand)"
    )


def _check_header(undo: rollback.UndoFile, *, point_id: str, disk_size: int, block_size: int) -> None:
    """A rollback file read for `point_id` must describe that point's disk: one of another block size or disk
    size (planted, or another replica's) would put its saved bytes on other blocks, an export that looks right."""
    h = undo.header
    if (h.base_point_id, h.block_size, h.disk_size) != (point_id, block_size, disk_size):
        raise FailedPrecondition(
            f"rollback file {undo.path.parent.parent.name}/{undo.path.name} does not match restore point {point_id}: "
            f"it is for point {h.base_point_id} with {h.block_size}-byte blocks and disk size {h.disk_size}, the "
            f"point has {block_size}-byte blocks and disk size {disk_size}"
        )


def _open_existing(path: Path) -> rollback.UndoFile | None:
    try:
        return rollback.UndoFile(path)
    except DiskError as e:
        if isinstance(e.__cause__, FileNotFoundError):
            return None
        raise


def find_point(vm_dir: Path, point_id: str) -> restore_points.Point:
    """The point `point_id` of the replica, or its newest with "" (NotFound when there is none)."""
    return _find(vm_dir, restore_points.list_points(vm_dir), point_id)


def _find(vm_dir: Path, points: list[restore_points.Point], point_id: str) -> restore_points.Point:
    if not points:
        raise NotFound(f"replica {vm_dir.name} has no restore point")
    if not point_id:
        return points[-1]
    for p in points:
        if p.id == point_id:
            return p
    raise NotFound(f"restore point {point_id} of replica {vm_dir.name} does not exist")


def open_point_disk(vm_dir: Path, point_id: str, disk_id: str) -> PointDisk:
    """Disk `disk_id` as restore point `point_id` ("" for the newest) holds it."""
    points = restore_points.list_points(vm_dir)  # read once: a deletion meanwhile changes nothing here
    point = _find(vm_dir, points, point_id)
    disk = next((d for d in point.disks if d.disk_id == disk_id), None)
    if disk is None:
        raise NotFound(f"restore point {point.id} has no disk {disk_id}")
    at = points.index(point)
    holding = [(p.id, d.disk_size) for p in points[at:] for d in p.disks if d.disk_id == disk_id]
    disk_dir = vm_dir / "disks" / disk_id
    st = replica.load_state(disk_dir)
    sessions = frozenset(p.session_id for p in points)
    at_rest = st.state == replica.IDLE or (st.state == replica.COMMITTED and st.session_id in sessions)
    if len(holding) == 1 and at_rest and st.disk_size != disk.disk_size:
        # The newest point's data is the replica file itself, whose size its state records.
        raise FailedPrecondition(
            f"restore point {point.id} says disk {disk_id} has {disk.disk_size} bytes, the replica disk "
            f"{st.disk_size}: {restore_points.POINTS_FILE} or {replica.STATE_FILE} was changed by hand"
        )
    return PointDisk(disk_dir, st, size=disk.disk_size, chain=holding[:-1], point_sessions=sessions)
