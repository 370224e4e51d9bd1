"""Reading a replica disk as it was at a restore point: for verification, export and failover.

`open_point_disk` is the one way in: a `PointDisk` is a `DiskReader` (size, allocated extents,
positional reads) plus the point's block digests, whatever the replica's state and format.
"""

from __future__ import annotations

from pathlib import Path

from target_agent import replica, restore_points
from target_agent.replica import DATA_FILE, DIGESTS_FILE, DigestStore
from vmrepl.disk.base import DiskReader
from vmrepl.disk.raw import RawReader
from vmrepl.errors import FailedPrecondition, NotFound
from vmrepl.extent import Extent


class PointDisk(DiskReader):
    """One disk of one restore point, read-only."""

    def __init__(self, disk_dir: Path, st: replica.DiskState) -> None:
        self.block_size = st.block_size
        self._data = RawReader(disk_dir / DATA_FILE)
        self._digests = DigestStore(
            disk_dir / DIGESTS_FILE, block_size=st.block_size, disk_size=st.disk_size, digests_format=st.digests_format
        )
        self._size = st.disk_size

    @property
    def size(self) -> int:
        return self._size

    @property
    def blocks(self) -> int:
        return -(-self._size // self.block_size)

    def allocated_extents(self) -> list[Extent]:
        return self._data.allocated_extents()

    def read_into(self, buf: memoryview, offset: int) -> None:
        self._data.read_into(buf, offset)

    def digests(self, first: int, count: int) -> bytes:
        """The point's digests of blocks [first, first+count): 16 bytes each, all zero = unknown."""
        return self._digests.read(first, count)

    def close(self) -> None:
        self._data.close()
        self._digests.close()


def find_point(vm_dir: Path, point_id: str) -> restore_points.Point:
    """The point `point_id` of the replica, or its newest with "" (NotFound when there is none)."""
    points = restore_points.list_points(vm_dir)
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
    point = find_point(vm_dir, point_id)
    if disk_id not in {d.disk_id for d in point.disks}:
        raise NotFound(f"restore point {point.id} has no disk {disk_id}")
    points = restore_points.list_points(vm_dir)
    disk_dir = vm_dir / "disks" / disk_id
    st = replica.load_state(disk_dir)
    if point.id != points[-1].id or st.session_id != point.session_id:
        raise FailedPrecondition(f"restore point {point.id}'s data is not on the target")
    return PointDisk(disk_dir, st)
