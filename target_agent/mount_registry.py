"""What a replica knows of the mounts over it: `<vm_dir>/mounts/<mount_id>.json`, one per mount.

A mount (target_agent.mounts) registers itself in the replica it mounts, so the code that writes the replica
finds it from the file system alone, whatever process or restart made it:

* every registration protects its restore point: DeleteRestorePoint refuses it (`refuse_protected`);
* a FAILOVER mount pauses replication: no session prepares or writes the replica (`refuse_failover`), since
  the failed-over VM's disks sit on the replica's data file;
* an active TEST mount (`cow`) gets the old bytes of each replica block a session is about to overwrite,
  first writer wins, durably, before the overwrite (`before_overwrite`): its point store then keeps the
  point's bytes while the replica moves on.

Registrations are written by the target itself (`atomic_write`) but read as files it did not write: each
is checked, and one that does not parse stops the writer with a message naming it (a TEST mount whose
bytes could no longer be kept must not be silently dropped).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vmrepl.disk.base import DiskWriter
from vmrepl.disk.fileio import atomic_write, make_dirs, read_bytes, remove
from vmrepl.disk.layer import ExtentStore
from vmrepl.errors import FailedPrecondition, PathError
from vmrepl.extent import MiB
from vmrepl.names import check_name

REGISTRY_DIR = "mounts"
SUFFIX = ".json"
FAILOVER, TEST = "failover", "test"
REGISTRATION_FORMAT = 1
# Old bytes read and handed to a point store at once (one write_missing: one data and one map fsync).
_COPY_RUN = 16 * MiB


@dataclass(kw_only=True)
class Registration:
    mount_id: str
    point_id: str
    kind: str  # FAILOVER or TEST
    # Copy-on-write is on: the mount's point stores hold every block the chain and the pending rollback
    # file held when it was made (off while a mount is being made, and for mounts that need none).
    cow: bool
    folder: str  # the mount's folder, absolute
    stores: dict[str, str] = field(default_factory=dict)  # disk id -> its point store's name in `folder`
    sizes: dict[str, int] = field(default_factory=dict)  # disk id -> the point's disk size


def path_of(vm_dir: Path, mount_id: str) -> Path:
    return vm_dir / REGISTRY_DIR / f"{mount_id}{SUFFIX}"


def register(vm_dir: Path, reg: Registration) -> None:
    """Write (or rewrite) a registration, durably."""
    make_dirs(vm_dir / REGISTRY_DIR)
    doc = asdict(reg) | {"format": REGISTRATION_FORMAT}
    atomic_write(path_of(vm_dir, reg.mount_id), json.dumps(doc, sort_keys=True).encode())


def unregister(vm_dir: Path, mount_id: str) -> None:
    remove(path_of(vm_dir, mount_id))


def registrations(vm_dir: Path) -> list[Registration]:
    """Every registration of the replica, checked."""
    folder = vm_dir / REGISTRY_DIR
    if folder.is_symlink():
        raise FailedPrecondition(f"{vm_dir.name}/{REGISTRY_DIR} is a symbolic link: move the folder back in place")
    if not folder.is_dir():
        return []
    out = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.endswith(SUFFIX) and not entry.name.endswith(".tmp"):
            out.append(_load(Path(entry.path)))
    return out


def _load(path: Path) -> Registration:
    what = f"mount registration {path.parent.parent.name}/{REGISTRY_DIR}/{path.name}"
    try:
        raw = json.loads(read_bytes(path, follow_links=False).decode("utf-8"))
        if not isinstance(raw, dict) or raw.pop("format", None) != REGISTRATION_FORMAT:
            raise ValueError("not a registration of a format this target reads")
        reg = Registration(**raw)
        _check(reg, path)
    except (OSError, ValueError, TypeError, PathError) as e:
        raise FailedPrecondition(f"{what} is damaged ({e}): UnmountPoint the mount, or remove the file by hand") from e
    return reg


def _check(reg: Registration, path: Path) -> None:
    check_name("mount_id", reg.mount_id)
    check_name("point_id", reg.point_id)
    if path.name != f"{reg.mount_id}{SUFFIX}":
        raise ValueError(f"it names mount {reg.mount_id}")
    if reg.kind not in (FAILOVER, TEST) or not isinstance(reg.cow, bool):
        raise ValueError("kind or cow is not valid")
    folder = Path(reg.folder) if isinstance(reg.folder, str) else None
    if folder is None or not folder.is_absolute() or folder.name != reg.mount_id or ".." in folder.parts:
        raise ValueError("folder is not the mount's folder")
    if not isinstance(reg.stores, dict) or not isinstance(reg.sizes, dict) or set(reg.stores) != set(reg.sizes):
        raise ValueError("stores and sizes do not list the same disks")
    for disk_id, store in reg.stores.items():
        check_name("disk_id", disk_id)
        check_name("store", store)
        size = reg.sizes[disk_id]
        if type(size) is not int or size < 0:
            raise ValueError(f"disk {disk_id}'s size is not a size")


def refuse_protected(vm_dir: Path, point_id: str) -> None:
    """DeleteRestorePoint (retention) never deletes a point a mount holds."""
    holders = [r.mount_id for r in registrations(vm_dir) if r.point_id == point_id]
    if holders:
        raise FailedPrecondition(
            f"restore point {point_id} is mounted ({', '.join(holders)}): it is kept until the mount is removed "
            "(UnmountPoint) or made permanent"
        )


def refuse_failover(vm_dir: Path) -> None:
    """No session writes a replica a FAILOVER mount sits on: the failed-over VM's base is its data file."""
    held = [r.mount_id for r in registrations(vm_dir) if r.kind == FAILOVER]
    if held:
        raise FailedPrecondition(
            f"replica {vm_dir.name} is failed over (mount {held[0]}): replication of the VM is paused until the "
            "failover is undone or made permanent"
        )


def before_overwrite(disk_dir: Path, writer: DiskWriter, blocks: Iterable[int], block_size: int) -> None:
    """Hand the old bytes of `blocks` (about to be overwritten for the first time since the newest point: the
    caller leaves out blocks its pending rollback file holds) to every active TEST mount's point store of
    this disk, first writer wins, durably. Call under the disk's guard (the one writer of those stores).
    Refuses (before anything is written) when a FAILOVER mount sits on the replica."""
    regs = registrations(disk_dir.parent.parent)
    if not regs:
        return
    if any(r.kind == FAILOVER for r in regs):
        refuse_failover(disk_dir.parent.parent)
    wanted = sorted(set(blocks))
    for reg in regs:
        if reg.cow and disk_dir.name in reg.stores:
            _copy_old(reg, disk_dir.name, writer, wanted, block_size)


def open_store(reg: Registration, disk_id: str) -> ExtentStore:
    """The point store of `disk_id` in the mount's folder; refused when the folder or the store is not there
    as the mount made it (a folder moved or replaced by a link: its bytes could not be kept)."""
    folder = Path(reg.folder)
    try:
        st = os.lstat(folder)
    except FileNotFoundError:
        st = None
    if st is None or not stat.S_ISDIR(st.st_mode):
        raise FailedPrecondition(
            f"test mount {reg.mount_id}: its folder {folder} is missing or not a folder, so the point's bytes "
            "cannot be kept before the replica is overwritten: UnmountPoint the mount, then replicate"
        )
    store = ExtentStore(folder, reg.stores[disk_id], size=reg.sizes[disk_id])
    if not store.exists():
        raise FailedPrecondition(
            f"test mount {reg.mount_id}: its point store {folder / reg.stores[disk_id]} is missing: UnmountPoint "
            "the mount, then replicate"
        )
    return store


def _copy_old(reg: Registration, disk_id: str, writer: DiskWriter, blocks: list[int], block_size: int) -> None:
    size = reg.sizes[disk_id]
    inside = [b for b in blocks if b * block_size < size]  # the point's disk ends there: nothing past it is read
    if not inside:
        return
    store = open_store(reg, disk_id)
    for first, count in _runs(inside, _COPY_RUN // block_size or 1):
        lo, hi = first * block_size, min(size, (first + count) * block_size)
        buf = bytearray(hi - lo)
        n = max(0, min(hi, writer.size) - lo)  # past the replica's end (a grown point): zeros
        if n:
            writer.read_into(memoryview(buf)[:n], lo)
        store.write_missing(lo, buf)


def _runs(blocks: list[int], most: int) -> list[tuple[int, int]]:
    """Sorted block numbers as (first, count) runs of consecutive blocks, each at most `most` long."""
    out: list[tuple[int, int]] = []
    for b in blocks:
        if out and out[-1][0] + out[-1][1] == b and out[-1][1] < most:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((b, 1))
    return out
