"""A VM replica as a whole: where it stands between restore points, and the calls that move it.

The state (`vmrepl.v1.ReplicaState`) is derived from the files, never stored apart from them: a disk whose
state names a session without a restore point is between points (WRITING, or RESUMABLE when the session's
controller said it will continue it); otherwise the replica is at its newest point, or EMPTY without one.
A session that made no restore point is rolled back when its controller says it will not continue it
(`end_session`), on request (`roll_back`), or by the next session that does not continue it (`prepare_disk`).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Concatenate, ParamSpec, TypeVar

from target_agent import mount_registry, replica, restore_points
from target_agent.replica import COMMITTED, IDLE, Base, DiskGuard, DiskState
from target_agent.restore_points import Point
from target_agent.rollback import SUFFIX
from vmrepl.disk.vhdx_format import MAX_VIRTUAL_SIZE
from vmrepl.disk.vhdx_writer import LOGICAL_SECTOR
from vmrepl.errors import FailedPrecondition, InvalidArgument, NotFound

EMPTY, AT_POINT, WRITING, RESUMABLE = "empty", "at_point", "writing", "resumable"
Guards = Callable[[Path], DiskGuard]


@dataclass(frozen=True)
class PointView:
    point: Point
    restorable: bool
    rollback_bytes: dict[str, int]  # per disk


@dataclass
class Status:
    state: str
    session_id: str = ""
    base_point_id: str = ""
    rolled_back_session: str = ""
    rolled_back_at: float = 0.0
    points: list[PointView] = field(default_factory=list)


P = ParamSpec("P")
R = TypeVar("R")


def _alone(fn: Callable[Concatenate[Path, P], R]) -> Callable[Concatenate[Path, P], R]:
    """Run a VM-wide step under the VM replica's lock (restore_points.vm_lock)."""

    def run(vm_dir: Path, /, *args: P.args, **kwargs: P.kwargs) -> R:
        with restore_points.vm_lock(vm_dir):
            return fn(vm_dir, *args, **kwargs)

    run.__name__, run.__doc__ = fn.__name__, fn.__doc__
    return run


def disk_dirs(vm_dir: Path) -> list[Path]:
    root = vm_dir / "disks"
    return sorted(d for d in root.iterdir() if (d / replica.STATE_FILE).exists()) if root.is_dir() else []


def _between(st: DiskState, point_sessions: frozenset[str]) -> bool:
    """The disk holds writes of a session that made no restore point."""
    return st.state != IDLE and not (st.state == COMMITTED and st.session_id in point_sessions)


@_alone
def prepare_disk(
    vm_dir: Path,
    disk_dir: Path,
    *,
    guards: Guards,
    disk_size: int,
    block_size: int,
    session_id: str,
    checkpoint_id: str,
    resume_session_id: str = "",
    replica_format: str = "raw",
) -> DiskState:
    """`replica.prepare` with what the VM's restore points say: the base point the session's overwrites are
    saved against. Other disks of the VM still holding writes of a session this one does not continue (nor
    from the same checkpoint) are rolled back first, so the replica never mixes two sessions."""
    _check_format_size(replica_format, disk_size)  # before anything changes
    points = restore_points.list_points(vm_dir)
    mount_registry.refuse_failover(vm_dir)
    sessions = frozenset(p.session_id for p in points)
    keep = {session_id, resume_session_id}
    for other in disk_dirs(vm_dir):
        if other != disk_dir:
            with guards(other).lock:
                st = replica.load_state(other)
                # A disk written from this checkpoint belongs to the held transfer this session continues,
                # even when this disk restarts without naming the session it continues (a disk that failed
                # is never continued): rolling it back would leave a disk the controller counts as done.
                if _between(st, sessions) and st.session_id not in keep and st.checkpoint_id != checkpoint_id:
                    _roll_back_locked(other, guards, sessions)
    holding = [p for p in points if disk_dir.name in {d.disk_id for d in p.disks}]
    base = None
    if holding:
        d = next(d for d in holding[-1].disks if d.disk_id == disk_dir.name)
        base = Base(holding[-1].id, d.disk_size, d.block_size or block_size)
    return replica.prepare(
        disk_dir,
        guard=guards(disk_dir),
        disk_size=disk_size,
        block_size=block_size,
        session_id=session_id,
        checkpoint_id=checkpoint_id,
        resume_session_id=resume_session_id,
        base=base,
        point_sessions=sessions,
        replica_format=replica_format,
    )


def _check_format_size(replica_format: str, disk_size: int) -> None:
    if replica_format == "vhdx" and (disk_size % LOGICAL_SECTOR or disk_size > MAX_VIRTUAL_SIZE):
        raise InvalidArgument(
            "disk_size",
            f"a VHDX replica's disk size is a multiple of {LOGICAL_SECTOR} bytes up to 64 TiB, not {disk_size}",
        )


def _roll_back_locked(disk_dir: Path, guards: Guards, sessions: frozenset[str]) -> None:
    """Stop any stream on the disk and return it to its newest point (call under its guard)."""
    guards(disk_dir).claim_locked()
    replica.settle_locked(disk_dir, sessions)
    st = replica.load_state(disk_dir)
    if _between(st, sessions):
        replica.roll_back_locked(disk_dir, st)


@_alone
def status(vm_dir: Path, *, guards: Guards) -> Status:
    points = restore_points.list_points(vm_dir)
    sessions = frozenset(p.session_id for p in points)
    states = []
    for d in disk_dirs(vm_dir):
        with guards(d).lock:
            replica.settle_locked(d, sessions)
            states.append(replica.load_state(d))
    between = [st for st in states if _between(st, sessions)]
    out = Status(EMPTY, base_point_id=points[-1].id if points else "", points=_views(vm_dir, points))
    if between:
        out.state = RESUMABLE if all(st.resumable for st in between) else WRITING
        out.session_id = between[0].session_id
    elif points:
        out.state = AT_POINT
    last = max(states, key=lambda st: st.rolled_back_at, default=None)
    if last is not None and last.rolled_back_session:
        out.rolled_back_session, out.rolled_back_at = last.rolled_back_session, last.rolled_back_at
    return out


def _views(vm_dir: Path, points: list[Point]) -> list[PointView]:
    """Each point with whether its data is all on disk: for every disk, the rollback file of each later
    point that holds the disk (the newest holding it has none: its data is the replica file)."""
    out = []
    for i, p in enumerate(points):
        sizes: dict[str, int] = {}
        restorable = True
        for d in p.disks:
            folder = vm_dir / "disks" / d.disk_id / replica.ROLLBACK_DIR
            chain = [q for q in points[i:] if d.disk_id in {x.disk_id for x in q.disks}]
            for q in chain[:-1]:  # each needs its own rollback file to step back from its successor
                size = _file_size(folder / f"{q.id}{SUFFIX}")
                if size is None:
                    restorable = False
                elif q is p:
                    sizes[d.disk_id] = size
            if _file_size(replica.data_file(vm_dir / "disks" / d.disk_id, d.replica_format)) is None:
                restorable = False
        out.append(PointView(p, restorable, sizes))
    return out


def _file_size(path: Path) -> int | None:
    """The size of a regular file at `path` (a link is not followed: a planted one is no rollback data)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


@_alone
def end_session(vm_dir: Path, session_id: str, *, keep_for_resume: bool, guards: Guards) -> Status:
    """The controller ends a session that made no restore point: kept for a resume, or rolled back now."""
    points = restore_points.list_points(vm_dir)
    sessions = frozenset(p.session_id for p in points)
    mine = 0
    for d in disk_dirs(vm_dir):
        with guards(d).lock:
            replica.settle_locked(d, sessions)
            st = replica.load_state(d)
            if st.rolled_back_session == session_id or (st.session_id == session_id and st.state == COMMITTED):
                mine += 1
            if st.session_id != session_id or not _between(st, sessions):
                continue
            mine += 1
            if keep_for_resume:
                st.resumable = True
                replica.save_state(d, st)
            else:
                _roll_back_locked(d, guards, sessions)
    if not mine and session_id not in sessions:
        raise FailedPrecondition(f"replica {vm_dir.name} holds no writes of session {session_id}")
    return status(vm_dir, guards=guards)


@_alone
def roll_back(vm_dir: Path, *, guards: Guards) -> Status:
    """Return every disk that is between points to the newest restore point."""
    if not vm_dir.is_dir():
        raise NotFound(f"replica {vm_dir.name} does not exist")
    sessions = frozenset(p.session_id for p in restore_points.list_points(vm_dir))
    for d in disk_dirs(vm_dir):
        with guards(d).lock:
            _roll_back_locked(d, guards, sessions)
    return status(vm_dir, guards=guards)
