"""Restore points of a VM replica: a durable list in `restore-points.json` of the VM directory.

A point records which session's disks it holds. Committing is idempotent per
session so a controller that retries after a crash never counts a point
twice. The rollback data behind each point comes with VHDX replica disks;
until then a point marks the state the replica reached.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from target_agent.replica import COMPLETE, load_state
from vmrepl.disk.fileio import atomic_write
from vmrepl.errors import FailedPrecondition, NotFound

POINTS_FILE = "restore-points.json"


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


def list_points(vm_dir: Path) -> list[Point]:
    try:
        raw = json.loads((vm_dir / POINTS_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    return [Point(p["id"], p["session_id"], p["created_at"], [PointDisk(**d) for d in p["disks"]]) for p in raw]


def _save(vm_dir: Path, points: list[Point]) -> None:
    atomic_write(vm_dir / POINTS_FILE, json.dumps([asdict(p) for p in points], indent=1).encode())


def commit(vm_dir: Path, *, session_id: str, disk_ids: list[str]) -> Point:
    points = list_points(vm_dir)
    for p in points:
        if p.session_id == session_id:
            return p
    disks = []
    for disk_id in disk_ids:
        st = load_state(vm_dir / "disks" / disk_id)
        if st.session_id != session_id or st.state != COMPLETE:
            raise FailedPrecondition(f"disk {disk_id} has not completed a transfer for session {session_id}")
        disks.append(PointDisk(disk_id, st.disk_size))
    point = Point(id=uuid.uuid4().hex, session_id=session_id, created_at=time.time(), disks=disks)
    _save(vm_dir, [*points, point])
    return point


def delete(vm_dir: Path, point_id: str) -> None:
    points = list_points(vm_dir)
    kept = [p for p in points if p.id != point_id]
    if len(kept) == len(points):
        raise NotFound(f"restore point {point_id} does not exist")
    _save(vm_dir, kept)
