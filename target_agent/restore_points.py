"""Restore points of a VM replica: a durable list in `restore-points.json` of the VM directory.

A point records which session's disks it holds, from which checkpoint, and the change-tracking reference
the next incremental starts from. Committing is idempotent per session and checkpoint so a controller that
retries after a crash never counts a point twice. Committing marks each disk `committed` first (under the
disk's guard, so no stream can be writing it): from then on no stream of that session and checkpoint writes
the disk again. Then the list is saved, and only then does each disk's pending rollback file become the
rollback data of the point before (`replica.settle_locked`; a crash between is settled by the next call
that touches the disk). The data behind an older point is the replica overlaid with the rollback files from
that point on (target_agent.points); deleting a point deletes or folds its rollback file, never rewriting
the replica.

A point may keep the VM's configuration (the provider's capture at the checkpoint: what failover registers
the replica VM with) in `configurations/<point id>.bin` beside the list, never inline: the list is
rewritten and parsed whole on every VM-wide call, and 1 MiB per point would make that tens of MiB. The file
is written and fsynced (file and folder) before the list that names it, so a point whose record is durable
has its configuration; the record carries its size and SHA-256, checked on every read. A file no point
names (a crash between the two writes, or a deletion cut short) is removed by the next commit.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from target_agent.file_format import check_format
from target_agent.mount_registry import refuse_protected
from target_agent.replica import (
    COMMITTED,
    COMPLETE,
    REPLICA_FORMATS,
    ROLLBACK_DIR,
    DiskGuard,
    check_folders,
    load_state,
    save_state,
    settle_locked,
)
from target_agent.rollback import SUFFIX, block_size_ok, disk_size_ok, fold
from vmrepl.disk.fileio import atomic_write, make_dirs, read_bytes, remove
from vmrepl.domain import MAX_DISK_SIZE, MAX_VM_CONFIGURATION
from vmrepl.errors import FailedPrecondition, InvalidArgument, NotFound, PathError
from vmrepl.names import check_name

POINTS_FILE = "restore-points.json"
# 1: a bare JSON list of points; 2: {"format": 2, "restore_points": [...]}.
POINTS_FORMAT = 2
CONFIG_DIR = "configurations"
CONFIG_SUFFIX = ".bin"
# Written by FlattenMount (target_agent.mounts): the replica's data became a VM's disks.
GIVEN_AWAY_FILE = "given-away.json"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


CONSISTENCIES = ("", "crash", "application")
_vm_locks: dict[Path, threading.RLock] = {}
_vm_locks_guard = threading.Lock()


def vm_lock(vm_dir: Path) -> threading.RLock:
    """One per VM replica in the process: restore-points.json is read, changed and saved under it, and a
    VM-wide step (a commit, a deletion, a rollback, a prepare that rolls other disks back) runs alone.
    Taken before any disk's guard, never after one."""
    with _vm_locks_guard:
        return _vm_locks.setdefault(vm_dir, threading.RLock())


@dataclass
class PointDisk:
    disk_id: str
    disk_size: int
    block_size: int = 0  # 0: a point from before rollback data (its disks' block size was not recorded)
    replica_format: str = "raw"


@dataclass
class Point:
    id: str
    session_id: str
    created_at: float
    disks: list[PointDisk] = field(default_factory=list)
    checkpoint_id: str = ""
    change_reference: str = ""
    consistency: str = ""
    # The VM's configuration kept with the point (configurations/<id>.bin): its size and SHA-256; "" none.
    configuration_size: int = 0
    configuration_sha256: str = ""


def list_points(vm_dir: Path) -> list[Point]:
    """The VM replica's points, oldest first; first of all its folders are checked (replica.check_folders):
    every VM-wide call starts here."""
    check_folders(vm_dir)
    refuse_given_away(vm_dir)
    if (vm_dir / CONFIG_DIR).is_symlink():
        raise FailedPrecondition(f"{vm_dir.name}/{CONFIG_DIR} is a symbolic link: move the folder itself back in place")
    try:
        raw = json.loads(read_bytes(vm_dir / POINTS_FILE, follow_links=False).decode("utf-8"))
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
        points = [_point(p) for p in raw]
    except (KeyError, TypeError, ValueError, PathError) as e:
        raise FailedPrecondition(f"{what} holds something that is not a restore point: {e}") from e
    # Ids name rollback files: two points of one id would share (and a deletion remove) one point's data.
    if len({p.id for p in points}) != len(points):
        raise FailedPrecondition(f"{what} lists a restore point id twice")
    if any(len({d.disk_id for d in p.disks}) != len(p.disks) for p in points):
        raise FailedPrecondition(f"{what} lists a disk twice in one restore point")
    return points


def give_away(vm_dir: Path, mount_id: str) -> None:
    """Mark the replica as no longer holding its points, durably: a permanent failover is merging the mount's
    layers into the base, which is the replica's data file (FlattenMount). Only DeleteReplica remains."""
    atomic_write(vm_dir / GIVEN_AWAY_FILE, json.dumps({"mount_id": mount_id}).encode())


def refuse_given_away(vm_dir: Path) -> None:
    if os.path.lexists(vm_dir / GIVEN_AWAY_FILE):
        raise FailedPrecondition(
            f"replica {vm_dir.name} was made a failed-over VM's disks for good (permanent failover: "
            f"{GIVEN_AWAY_FILE}): its data no longer holds its restore points; only DeleteReplica remains"
        )


def _point(p: dict[str, Any]) -> Point:
    point = Point(
        str(p["id"]),
        p["session_id"],
        float(p["created_at"]),
        [PointDisk(**d) for d in p["disks"]],
        p.get("checkpoint_id", ""),
        p.get("change_reference", ""),
        p.get("consistency", ""),
        p.get("configuration_size", 0),
        p.get("configuration_sha256", ""),
    )
    texts = (p["id"], point.session_id, point.checkpoint_id, point.change_reference, point.consistency)
    if not all(isinstance(v, str) for v in texts):
        raise ValueError("id, session_id, checkpoint_id, change_reference and consistency are strings")
    # Ids name files (rollback/<id>.undo) and directories (disks/<id>): a planted "../x" must not.
    for name in (point.id, *(d.disk_id for d in point.disks)):
        check_name("restore point", name)
    if point.consistency not in CONSISTENCIES:
        raise ValueError(f"consistency is one of {CONSISTENCIES}")
    if not math.isfinite(point.created_at):
        raise ValueError("created_at is a time")
    size, sha = point.configuration_size, point.configuration_sha256
    if type(size) is not int or not 0 <= size <= MAX_VM_CONFIGURATION or not isinstance(sha, str):
        raise ValueError(f"configuration_size is a number from 0 to {MAX_VM_CONFIGURATION}")
    if not (_SHA256.fullmatch(sha) or (sha == "" and size == 0)):
        raise ValueError("configuration_sha256 is 64 hex digits, or empty with configuration_size 0")
    for d in point.disks:
        # disk_size must be a plain whole number: a string or null here reaches GetRestorePoint's reply.
        if not isinstance(d.disk_id, str) or isinstance(d.disk_size, bool) or not isinstance(d.disk_size, int):
            raise ValueError("a disk is a disk_id string and a disk_size number")
        if not disk_size_ok(d.disk_size, empty=True):
            raise ValueError(f"a disk's disk_size is from 0 to {MAX_DISK_SIZE}")
        if not (block_size_ok(d.block_size) or (type(d.block_size) is int and d.block_size == 0)):
            raise ValueError("a disk's block_size is 0 (not recorded) or a power of two from 512 bytes")
        if d.replica_format not in REPLICA_FORMATS:
            raise ValueError(f"a disk's replica_format is one of {REPLICA_FORMATS}")
    return point


def save_points(vm_dir: Path, points: list[Point]) -> None:
    """Replace the list, durably (call under the VM's lock): a failback disk's point of the original."""
    _save(vm_dir, points)


def _save(vm_dir: Path, points: list[Point]) -> None:
    doc = {"format": POINTS_FORMAT, "restore_points": [asdict(p) for p in points]}
    atomic_write(vm_dir / POINTS_FILE, json.dumps(doc, indent=1).encode())


def commit(
    vm_dir: Path,
    *,
    session_id: str,
    checkpoint_id: str,
    disk_ids: list[str],
    guard: Callable[[Path], DiskGuard],
    change_reference: str = "",
    consistency: str = "",
    vm_configuration: bytes = b"",
) -> Point:
    """The point of this session and checkpoint: made now, or the one an earlier call made (a retry is
    answered with that point as it was committed, its configuration included)."""
    if len(vm_configuration) > MAX_VM_CONFIGURATION:
        raise InvalidArgument("vm_configuration", f"at most {MAX_VM_CONFIGURATION} bytes")
    with vm_lock(vm_dir):
        return _commit(
            vm_dir,
            session_id=session_id,
            checkpoint_id=checkpoint_id,
            disk_ids=disk_ids,
            guard=guard,
            change_reference=change_reference,
            consistency=consistency,
            vm_configuration=vm_configuration,
        )


def _commit(
    vm_dir: Path,
    *,
    session_id: str,
    checkpoint_id: str,
    disk_ids: list[str],
    guard: Callable[[Path], DiskGuard],
    change_reference: str,
    consistency: str,
    vm_configuration: bytes,
) -> Point:
    points = list_points(vm_dir)
    for p in points:
        if (p.session_id, p.checkpoint_id) == (session_id, checkpoint_id):
            _settle(vm_dir, p.disks, points, guard)  # a crash may have cut the commit short after the list
            return p
    disks = [_seal(vm_dir / "disks" / disk_id, guard, session_id, checkpoint_id) for disk_id in disk_ids]
    point = Point(
        id=uuid.uuid4().hex,
        session_id=session_id,
        created_at=time.time(),
        disks=disks,
        checkpoint_id=checkpoint_id,
        change_reference=change_reference,
        consistency=consistency,
    )
    _drop_unlisted_configurations(vm_dir, points)
    if vm_configuration:
        make_dirs(vm_dir / CONFIG_DIR)
        atomic_write(configuration_file(vm_dir, point.id), vm_configuration)  # durable before the list names it
        point.configuration_size = len(vm_configuration)
        point.configuration_sha256 = hashlib.sha256(vm_configuration).hexdigest()
    points.append(point)
    _save(vm_dir, points)
    _settle(vm_dir, disks, points, guard)
    return point


def configuration_file(vm_dir: Path, point_id: str) -> Path:
    return vm_dir / CONFIG_DIR / f"{point_id}{CONFIG_SUFFIX}"


def read_configuration(vm_dir: Path, point: Point) -> bytes:
    """The VM configuration kept with `point` (b"" when none was), checked against its record."""
    if not point.configuration_sha256:
        return b""
    path = configuration_file(vm_dir, point.id)
    what = f"{vm_dir.name}/{CONFIG_DIR}/{path.name}, the VM configuration of restore point {point.id},"
    try:
        data = read_bytes(path, follow_links=False)
    except FileNotFoundError as e:
        raise FailedPrecondition(f"{what} is missing") from e
    except OSError as e:
        raise FailedPrecondition(f"{what} cannot be read: {e}") from e
    if len(data) != point.configuration_size or hashlib.sha256(data).hexdigest() != point.configuration_sha256:
        raise FailedPrecondition(f"{what} is not the one committed (its size or SHA-256 differs)")
    return data


def _drop_unlisted_configurations(vm_dir: Path, points: list[Point]) -> None:
    """Remove the configuration files no listed point names (and temporaries a crash left): a commit cut
    short after writing its file, a deletion cut short before removing one. Under the VM's lock."""
    folder = vm_dir / CONFIG_DIR
    if not folder.is_dir():
        return
    named = {configuration_file(vm_dir, p.id).name for p in points if p.configuration_sha256}
    for entry in os.scandir(folder):
        if entry.name not in named and not entry.is_dir(follow_symlinks=False):
            remove(Path(entry.path))


def _settle(vm_dir: Path, disks: list[PointDisk], points: list[Point], guard: Callable[[Path], DiskGuard]) -> None:
    sessions = frozenset(p.session_id for p in points)
    for d in disks:
        disk_dir = vm_dir / "disks" / d.disk_id
        with guard(disk_dir).lock:
            settle_locked(disk_dir, sessions)


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
    return PointDisk(disk_dir.name, st.disk_size, st.block_size, st.replica_format)


def delete(vm_dir: Path, point_id: str, *, guard: Callable[[Path], DiskGuard]) -> None:
    """Delete a point without rewriting the replica: the oldest point's rollback files go; a point between
    others has its rollback data folded into the older neighbour's; the newest point, which the replica
    itself holds, only when it is the last one. Under the VM's lock: a commit, a rollback or another
    deletion saving the list meanwhile would lose a point or bring a deleted one back."""
    with vm_lock(vm_dir):
        _delete(vm_dir, point_id, guard=guard)


def _delete(vm_dir: Path, point_id: str, *, guard: Callable[[Path], DiskGuard]) -> None:
    points = list_points(vm_dir)
    at = next((i for i, p in enumerate(points) if p.id == point_id), None)
    if at is None:
        raise NotFound(f"restore point {point_id} does not exist")
    point = points[at]
    refuse_protected(vm_dir, point_id)
    if at == len(points) - 1 and at > 0:
        raise FailedPrecondition(
            f"restore point {point_id} is the replica's newest: its data is the replica itself (delete older points, "
            "or let the next session's point take its place)"
        )
    _settle(vm_dir, point.disks, points, guard)
    for d in point.disks:
        older = next((p for p in reversed(points[:at]) if d.disk_id in {x.disk_id for x in p.disks}), None)
        if older is not None:
            disk_dir = vm_dir / "disks" / d.disk_id
            with guard(disk_dir).lock:
                fold(disk_dir / ROLLBACK_DIR, newer=point.id, older=older.id)
    _save(vm_dir, points[:at] + points[at + 1 :])
    for d in point.disks:
        remove(vm_dir / "disks" / d.disk_id / ROLLBACK_DIR / f"{point.id}{SUFFIX}")
    remove(configuration_file(vm_dir, point.id))
