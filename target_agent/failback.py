"""Failback disks: the original VM's disk written in place, with a way back.

`PrepareFailbackDisk` makes a replica disk (under a replica path like `.failback/<job>/<vm>`) whose data
file is a hard link of the original disk, its digests computed from the original's content, and one
restore point standing for "the original as it was" (session `ORIGINAL_SESSION`). A following normal session
(PrepareReplicaDisk, Transfer comparing digests, CommitRestorePoint) then overwrites only the blocks that
differ, each original block saved in the pending rollback file before it is overwritten, as for any
replica with a point: a failback cut short resumes, or RollbackReplica writes the original blocks back.

`failback.json` in the replica folder records each disk's original (path, device and inode); the data file
must still be that inode (`check_originals`) before a prepare, a commit and in GetReplicaDisk: an original
replaced meanwhile (copied over, restored from a backup) would have the failback write a file no VM uses.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from target_agent import replica, restore_points, vm_replica
from target_agent.replica import DIGESTS_FILE, IDLE, ROLLBACK_DIR, DigestStore, DiskState
from vmrepl.block import digest
from vmrepl.disk.base import create_writer, open_reader, open_writer
from vmrepl.disk.fileio import atomic_write, link, make_dirs, read_bytes, remove, sync_dir
from vmrepl.domain import DiskFormat, check_disk_size
from vmrepl.errors import FailedPrecondition, InvalidArgument, NotFound, PathError
from vmrepl.extent import MiB
from vmrepl.host_paths import Mapping, is_host_path, map_host_path
from vmrepl.names import FAILBACK_ROOT, check_name

FAILBACK_FILE = "failback.json"
ORIGINAL_SESSION = "failback-original"
_FORMAT = 1
_READ = 4 * MiB
# Held while a failback folder is made with its parents (prepare) and while an emptied parent is removed
# (DeleteReplica): a job's `.failback/<job>/` removed between a prepare making it and making `<vm>` inside it
# would fail that prepare. One agent process serves a datastore, so a lock of the process is enough; and
# os.rmdir removes only an empty folder, so a parent holding another VM's failback folder always stays.
_PARENTS = threading.Lock()


def _make_folder(vm_dir: Path) -> None:
    with _PARENTS:
        make_dirs(vm_dir)


def drop_empty_parents(root: Path, vm_dir: Path) -> None:
    """After a failback folder `<root>/.failback/<job>/<vm>` is deleted: its job folder (and any folder between)
    removed if nothing else is left in it, never `.failback` itself. Nothing for a replica elsewhere. A crash
    before this leaves an empty job folder, which the next DeleteReplica of a VM of that job removes."""
    top = Path(os.path.realpath(root / FAILBACK_ROOT))
    with _PARENTS:
        for folder in vm_dir.parents:
            if top not in folder.parents:
                return
            try:
                os.rmdir(folder)
            except OSError:  # not empty (another VM's failback folder), gone already, or not a folder
                return
            sync_dir(folder.parent)


@dataclass(kw_only=True)
class Original:
    path: str
    dev: int
    ino: int
    # Made by this failback folder (a failback to a new location): DeleteReplica with remove_created removes it.
    created: bool = False


def check_original_path(
    roots: Sequence[Path],
    original_path: str,
    *,
    host_paths: Sequence[Mapping] = (),
    datastore: Path | None = None,
) -> Path:
    """The original disk's path: absolute, inside one of `roots` and not in `datastore` (a failback_roots
    folder may hold it: one file system), no symbolic link on the way, a file. A Hyper-V host's path
    (`C:\\Hyper-V\\web01.vhdx`, as its provider names the original) is first mapped to this target's folder
    by the `host_paths` setting; the checks are then the same on the mapped path."""
    if not roots:
        raise FailedPrecondition(
            "this target has no failback_roots setting: it writes no original disk (set failback_roots to the "
            "folders holding the original VMs' disks, or make the job's failback_target a target that has them)"
        )
    if is_host_path(original_path):
        mapped = map_host_path(original_path, host_paths, field="original_path")
        if mapped is None:
            raise FailedPrecondition(
                f"original disk {original_path} is a Hyper-V host's path and no host_paths mapping of this "
                "target maps it (host_prefix -> the local folder holding it)"
            )
        original_path = str(mapped[0])
    path = Path(original_path)
    if not original_path or not path.is_absolute() or ".." in path.parts or "\x00" in original_path:
        raise InvalidArgument("original_path", "must be an absolute path without '..'")
    if os.path.realpath(path) != os.path.normpath(path):
        raise PathError("original_path", f"{original_path} goes through a symbolic link: refused")
    if not any(Path(os.path.realpath(r)) in path.parents for r in roots):
        raise PathError(
            "original_path",
            f"{original_path} is not under any of the target's failback_roots: add the folder holding it",
        )
    if datastore is not None and Path(os.path.realpath(datastore)) in path.parents:
        raise PathError("original_path", f"{original_path} is in the target's datastore: no VM's disk is there")
    try:
        st = os.lstat(path)
    except FileNotFoundError as e:
        raise FailedPrecondition(f"original disk {original_path} does not exist") from e
    if not stat.S_ISREG(st.st_mode):
        raise FailedPrecondition(f"original disk {original_path} is not a regular file")
    return path


def check_new_path(roots: Sequence[Path], new_path: str, *, datastore: Path | None = None) -> Path:
    """A disk image to create (failback to a new location): absolute, no '..', no symbolic link on the part of
    the way that exists, strictly inside one of `roots` and not in `datastore` (the file itself may not exist
    yet)."""
    if not roots:
        raise FailedPrecondition("this target has no failback_roots setting: it writes no original disk")
    path = Path(new_path)
    if not new_path or not path.is_absolute() or ".." in path.parts or "\x00" in new_path:
        raise InvalidArgument("original_path", "must be an absolute path without '..'")
    if os.path.realpath(path) != os.path.normpath(path):
        raise PathError("original_path", f"{new_path} goes through a symbolic link: refused")
    if not any(Path(os.path.realpath(r)) in path.parent.parents for r in roots):
        raise PathError(
            "original_path", f"{new_path} is not in a folder under one of the target's failback_roots (a VM folder)"
        )
    if datastore is not None and Path(os.path.realpath(datastore)) in path.parents:
        raise PathError("original_path", f"{new_path} is in the target's datastore: no VM's disk is made there")
    return path


def _originals(vm_dir: Path) -> dict[str, Original] | None:
    path = vm_dir / FAILBACK_FILE
    if not os.path.lexists(path):
        return None
    try:
        raw = json.loads(read_bytes(path, follow_links=False).decode("utf-8"))
        if not isinstance(raw, dict) or raw.get("format") != _FORMAT or not isinstance(raw.get("disks"), dict):
            raise ValueError("not a failback record")
        out = {check_name("disk_id", k): Original(**v) for k, v in raw["disks"].items()}
        for o in out.values():
            if not isinstance(o.path, str) or type(o.dev) is not int or type(o.ino) is not int:
                raise ValueError("an original is not a path, a device and an inode")
            if type(o.created) is not bool:
                raise ValueError("an original's 'created' is not true or false")
    except (OSError, ValueError, TypeError, PathError) as e:
        raise FailedPrecondition(f"{vm_dir.name}/{FAILBACK_FILE} is damaged: {e}") from e
    return out


def _save_originals(vm_dir: Path, originals: dict[str, Original]) -> None:
    doc = {"format": _FORMAT, "disks": {k: asdict(v) for k, v in originals.items()}}
    atomic_write(vm_dir / FAILBACK_FILE, json.dumps(doc, indent=1).encode())


def check_originals(vm_dir: Path, disk_ids: Sequence[str] | None = None) -> None:
    """Each failback disk's data file is still its original's inode (no-op for a replica that is none)."""
    originals = _originals(vm_dir) if vm_dir.is_dir() else None
    if originals is None:
        return
    for disk_id, o in originals.items():
        if disk_ids is not None and disk_id not in disk_ids:
            continue
        disk_dir = vm_dir / "disks" / disk_id
        try:
            st = replica.load_state(disk_dir)
            data = os.lstat(replica.data_file(disk_dir, st.replica_format))
            orig = stat_no_links(Path(o.path))
        except (FileNotFoundError, NotFound) as e:
            raise FailedPrecondition(f"failback disk {disk_id}: its original {o.path} or its link is gone") from e
        ids = {(data.st_dev, data.st_ino), (orig.st_dev, orig.st_ino), (o.dev, o.ino)}
        if len(ids) != 1 or not stat.S_ISREG(orig.st_mode):
            raise FailedPrecondition(
                f"failback disk {disk_id} is no longer the original {o.path} (another file is there now): the "
                "failback would not write the VM's disk; DeleteReplica the failback folder and prepare it again"
            )


def prepare(
    vm_dir: Path,
    disk_dir: Path,
    *,
    guards: vm_replica.Guards,
    original: Path,
    replica_format: str,
    block_size: int,
    create_size: int | None = None,
) -> DiskState:
    """Make the failback disk, or answer it as it is (idempotent). With `create_size`, `original` is a new,
    empty image of that size made for it (a failback to a new location), not an existing disk."""
    with restore_points.vm_lock(vm_dir):
        _make_folder(vm_dir)
        points = restore_points.list_points(vm_dir)
        originals = _originals(vm_dir)
        if points and originals is None:
            raise FailedPrecondition(f"{vm_dir.name} holds a replica, not failback disks: choose another replica_path")
        originals = originals or {}
        known = originals.get(disk_dir.name)
        if known is not None and known.path != str(original):
            raise FailedPrecondition(f"failback disk {disk_dir.name} was prepared for {known.path}, not {original}")
        if known is not None and points and disk_dir.name in {d.disk_id for d in points[0].disks}:
            check_originals(vm_dir, [disk_dir.name])
            return replica.load_state(disk_dir)  # made already (and maybe written since)
        if len(points) > 1 or any(replica.load_state(d).state != IDLE for d in vm_replica.disk_dirs(vm_dir)):
            raise FailedPrecondition(
                f"a failback session already wrote {vm_dir.name}: prepare every failback disk before the session"
            )
        if create_size is not None:
            with guards(disk_dir).lock:
                state = _create_disk(
                    vm_dir,
                    disk_dir,
                    originals=originals,
                    new=original,
                    replica_format=replica_format,
                    block_size=block_size,
                    size=create_size,
                )
            _add_to_original_point(vm_dir, points, disk_dir.name, state)
            return state
        st = _single_link(original, replica.data_file(disk_dir, replica_format))
        originals[disk_dir.name] = Original(path=str(original), dev=st.st_dev, ino=st.st_ino)
        _save_originals(vm_dir, originals)  # before the link: a crash leaves a known original
        with guards(disk_dir).lock:
            state = _make_disk(disk_dir, original, replica_format, block_size)
        _add_to_original_point(vm_dir, points, disk_dir.name, state)
        return state


def _single_link(original: Path, data: Path) -> os.stat_result:
    """The original's status, refused when it has a hard link other than this failback disk's: the file
    would then be someone else's too (a replica on the datastore's file system, a system file), and the
    failback would write it."""
    st = stat_no_links(original)
    ours = 0
    with contextlib.suppress(FileNotFoundError):
        have = os.lstat(data)
        ours = int((have.st_dev, have.st_ino) == (st.st_dev, st.st_ino))
    if st.st_nlink - ours != 1:
        raise FailedPrecondition(
            f"original disk {original} has {st.st_nlink - ours - 1} other hard link(s): it may be another "
            "file's too, and a failback writes it in place (copy it to a file of its own)"
        )
    return st


def stat_no_links(path: Path) -> os.stat_result:
    """`path`'s status, reached from `/` one folder at a time without following a symbolic link: the path was
    checked before, but whoever may write the roots can swap a folder for a link since."""
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in path.parts[1:-1]:
            try:
                child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as e:
                if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                raise FailedPrecondition(f"{path} goes through a symbolic link or a file ({part}): refused") from e
            os.close(fd)
            fd = child
        return os.stat(path.name, dir_fd=fd, follow_symlinks=False)
    finally:
        os.close(fd)


def _same_file(data: Path, original: Path) -> bool:
    have = os.lstat(data)
    try:
        real = stat_no_links(original)
    except (FailedPrecondition, FileNotFoundError):
        return False
    return stat.S_ISREG(have.st_mode) and (have.st_dev, have.st_ino) == (real.st_dev, real.st_ino)


def _make_disk(disk_dir: Path, original: Path, replica_format: str, block_size: int) -> DiskState:
    make_dirs(disk_dir / ROLLBACK_DIR)
    data = replica.data_file(disk_dir, replica_format)
    _link_original(original, data)
    if not _same_file(data, original):
        remove(data)  # linked through a folder swapped for a link meanwhile: another file, never written
        raise FailedPrecondition(f"original disk {original} changed while it was linked (a folder swapped?): refused")
    open_writer(DiskFormat(replica_format), data).close()  # a session could write it: refused now if not
    size = _compute_digests(disk_dir, data, replica_format, block_size)
    st = DiskState(size, block_size, "", IDLE, replica_format=replica_format)
    st.committed_offset = st.frontier = size
    replica.save_state(disk_dir, st)
    return st


def _create_disk(
    vm_dir: Path,
    disk_dir: Path,
    *,
    originals: dict[str, Original],
    new: Path,
    replica_format: str,
    block_size: int,
    size: int,
) -> DiskState:
    """A new, empty image made in the disk's folder, recorded (`created`, with its inode) and only then linked
    at `new`: whatever a crash leaves at `new` is named by the record, so DeleteReplica's remove_created finds
    it. Its digests are the zero block's."""
    check_disk_size("size", size)
    make_dirs(disk_dir / ROLLBACK_DIR)
    data = replica.data_file(disk_dir, replica_format)
    fmt = DiskFormat(replica_format)
    if not os.path.lexists(data):
        create_writer(fmt, data, size=size, block_size=block_size).close()
    have = os.lstat(data)
    writer = open_writer(fmt, data)  # a regular file of that format (never through a link)
    made = writer.size
    writer.close()
    if not stat.S_ISREG(have.st_mode) or made != size:
        raise FailedPrecondition(
            f"failback disk {disk_dir.name}: an earlier attempt made a {made}-byte image, not {size}: "
            "DeleteReplica the failback folder and prepare it again"
        )
    originals[disk_dir.name] = Original(path=str(new), dev=have.st_dev, ino=have.st_ino, created=True)
    _save_originals(vm_dir, originals)
    _link_new(data, new, have)
    store = DigestStore(disk_dir / DIGESTS_FILE, block_size=block_size, disk_size=size)
    try:
        store.forget_all()
        store.put_zero(0, size)
        store.flush()
    finally:
        store.close()
    st = DiskState(size, block_size, "", IDLE, replica_format=replica_format)
    st.committed_offset = st.frontier = size
    replica.save_state(disk_dir, st)
    return st


def _link_new(data: Path, new: Path, have: os.stat_result) -> None:
    """`new` a hard link of the image made; a file already there that is not it is never replaced."""
    make_dirs(new.parent)
    if os.path.realpath(new.parent) != os.path.normpath(new.parent):  # a link planted since the path was checked
        raise PathError("original_path", f"{new.parent} goes through a symbolic link: refused")
    try:
        link(data, new)
    except FileExistsError:
        there = os.lstat(new)
        if (there.st_dev, there.st_ino) != (have.st_dev, have.st_ino):
            raise FailedPrecondition(
                f"{new} exists already: a failback to a new location never overwrites a file (choose another folder)"
            ) from None
    except OSError as e:
        if e.errno == errno.EXDEV:
            raise FailedPrecondition(
                f"{new.parent} is on another file system than the datastore: a failback disk is a hard link of "
                "the new image (put the datastore on its file system)"
            ) from e
        raise


def remove_created(vm_dir: Path) -> list[str]:
    """The images this failback folder created (`created` originals), each removed while it is still the
    file it made (another file there now is left alone), and its folder when that is left empty."""
    originals = _originals(vm_dir) if vm_dir.is_dir() else None
    removed: list[str] = []
    for o in (originals or {}).values():
        if not o.created:
            continue
        path = Path(o.path)
        try:
            st: os.stat_result | None = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            st = None  # never linked (a crash before it), or removed already: its folder may be left
        if st is not None and stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) == (o.dev, o.ino):
            remove(path)
            removed.append(o.path)
        _remove_if_empty(path.parent)
    return removed


def _remove_if_empty(folder: Path) -> None:
    try:
        if stat.S_ISDIR(os.lstat(folder).st_mode):
            os.rmdir(folder)
            sync_dir(folder.parent)
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
            raise


def _link_original(original: Path, data: Path) -> None:
    want = os.lstat(original)
    try:
        have = os.lstat(data)
        if (have.st_dev, have.st_ino) == (want.st_dev, want.st_ino):
            return
        remove(data)  # an earlier attempt's link to a file since replaced, or one planted: never followed
    except FileNotFoundError:
        pass
    try:
        link(original, data)
    except OSError as e:
        if e.errno == errno.EXDEV:
            raise FailedPrecondition(
                f"original disk {original} is on another file system than the datastore: a failback disk is a hard "
                "link of it (put the datastore on the original's file system)"
            ) from e
        raise


def _compute_digests(disk_dir: Path, data: Path, replica_format: str, block_size: int) -> int:
    """The original's digests, one per block (unallocated ranges: the zero digest), flushed; its size."""
    reader = open_reader(DiskFormat(replica_format), data, follow_links=False)
    try:
        size = check_disk_size("original disk size", reader.size)
        store = DigestStore(disk_dir / DIGESTS_FILE, block_size=block_size, disk_size=size)
        try:
            store.forget_all()
            done = 0
            buf = bytearray(block_size)
            for e in reader.allocated_extents():
                first = e.offset // block_size
                if first * block_size > done:
                    store.put_zero(done, first * block_size - done)
                for b in range(max(first, done // block_size), -(-min(e.end, size) // block_size)):
                    n = min(block_size, size - b * block_size)
                    reader.read_into(memoryview(buf)[:n], b * block_size)
                    store.put(b * block_size, digest(memoryview(buf)[:n]))
                    done = b * block_size + n
            if done < size:
                store.put_zero(done, size - done)
            store.flush()
        finally:
            store.close()
    finally:
        reader.close()
    return size


def _add_to_original_point(
    vm_dir: Path, points: list[restore_points.Point], disk_id: str, state: DiskState
) -> restore_points.Point:
    """The point standing for the originals as they were, with this disk in it."""
    disk = restore_points.PointDisk(disk_id, state.disk_size, state.block_size, state.replica_format)
    if points:
        point = points[0]
        point.disks = [d for d in point.disks if d.disk_id != disk_id] + [disk]
    else:
        point = restore_points.Point(
            id=uuid.uuid4().hex, session_id=ORIGINAL_SESSION, created_at=time.time(), disks=[disk]
        )
        points = [point]
    restore_points.save_points(vm_dir, points)
    return point
