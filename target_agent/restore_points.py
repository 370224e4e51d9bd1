"""Restore points of a VM replica: a durable list in `restore-points.json` of the VM directory.

A point records which session's disks it holds, and from which checkpoint.
Committing is idempotent per session and checkpoint so a controller that
retries after a crash never counts a point twice. Committing marks each disk
`committed` first (under the disk's guard, so no stream can be writing it):
from then on no stream of that session and checkpoint writes the disk again.
The rollback data behind each point comes with VHDX replica disks; until
then a point marks the state the replica reached.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from target_agent.file_format import check_format
from target_agent.replica import COMMITTED, COMPLETE, DiskGuard, load_state, save_state
from vmrepl.disk.fileio import atomic_write
from vmrepl.errors import FailedPrecondition, NotFound

POINTS_FILE = "restore-points.json"
# 1: a bare JSON list of points; 2: {"format": 2, "restore_points": [...]}.
POINTS_FORMAT = 2


@dataclass
class PointDisk:
    disk_id: str
    disk_size: int


@dataclass
class Point:
    id: str
    session_id: str
    created_at: float
    disks: list[PointDisk] = field(default_factory=list)
    checkpoint_id: str = ""


def list_points(vm_dir: Path) -> list[Point]:
    try:
        raw = json.loads((vm_dir / POINTS_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as e:
        raise FailedPrecondition(f"{POINTS_FILE} of {vm_dir.name} cannot be read: {e}") from e
    what = f"{POINTS_FILE} of {vm_dir.name}"
    if isinstance(raw, dict):  # format 2 on: {"format": n, "restore_points": [...]}
        check_format(what, raw.get("format"), reads=POINTS_FORMAT)
        raw = raw.get("restore_points")
    if not isinstance(raw, list):  # format 1 was the bare list
        raise FailedPrecondition(f"{what} is not a list of restore points")
    try:
        return [_point(p) for p in raw]
    except (KeyError, TypeError, ValueError) as e:
        raise FailedPrecondition(f"{what} holds something that is not a restore point: {e!r}") from e


def _point(p: dict[str, Any]) -> Point:
    point = Point(
        str(p["id"]),
        p["session_id"],
        float(p["created_at"]),
        [PointDisk(**d) for d in p["disks"]],
        p.get("checkpoint_id", ""),
    )
    if not all(isinstance(v, str) for v in (p["id"], point.session_id, point.checkpoint_id)):
        raise ValueError("id, session_id and checkpoint_id are strings")
    if not math.isfinite(point.created_at):
        raise ValueError("created_at is a time")
    for d in point.disks:
        # disk_size must be a plain whole number: a string or null here reaches GetRestorePoint's reply.
        if not isinstance(d.disk_id, str) or isinstance(d.disk_size, bool) or not isinstance(d.disk_size, int):
            raise ValueError("a disk is a disk_id string and a disk_size number")
        if d.disk_size < 0:
            raise ValueError("a disk's disk_size is not negative")
    return point


def _save(vm_dir: Path, points: list[Point]) -> None:
    doc = {"format": POINTS_FORMAT, "restore_points": [asdict(p) for p in points]}
    atomic_write(vm_dir / POINTS_FILE, json.dumps(doc, indent=1).encode())


def commit(
    vm_dir: Path, *, session_id: str, checkpoint_id: str, disk_ids: list[str], guard: Callable[[Path], DiskGuard]
) -> Point:
    points = list_points(vm_dir)
    for p in points:
        if (p.session_id, p.checkpoint_id) == (session_id, checkpoint_id):
            return p
    disks = [_seal(vm_dir / "disks" / disk_id, guard, session_id, checkpoint_id) for disk_id in disk_ids]
    point = Point(
        id=uuid.uuid4().hex, session_id=session_id, created_at=time.time(), disks=disks, checkpoint_id=checkpoint_id
    )
    _save(vm_dir, [*points, point])
    return point


def _seal(disk_dir: Path, guard: Callable[[Path], DiskGuard], session_id: str, checkpoint_id: str) -> PointDisk:
    """Check the disk completed this session's transfer from this checkpoint, and close it to streams."""
    g = guard(disk_dir)
    with g.lock:
        st = load_state(disk_dir)
        if (st.session_id, st.checkpoint_id) != (session_id, checkpoint_id) or st.state not in (COMPLETE, COMMITTED):
            raise FailedPrecondition(
                f"disk {disk_dir.name} has not completed a transfer for session {session_id} "
                f"from checkpoint {checkpoint_id}"
            )
        if st.state == COMPLETE:
            g.claim_locked()  # a stream still open on the disk stops touching it
            st.state = COMMITTED
            save_state(disk_dir, st)
    return PointDisk(disk_dir.name, st.disk_size)


def delete(vm_dir: Path, point_id: str) -> None:
    points = list_points(vm_dir)
    kept = [p for p in points if p.id != point_id]
    if len(kept) == len(points):
        raise NotFound(f"restore point {point_id} does not exist")
    _save(vm_dir, kept)
