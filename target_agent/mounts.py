"""Mounts: a restore point's disks as a VM folder under `vm_root`, for failover and test failover.

A mount's record is `<datastore_root>/.mounts/<mount_id>.json`; its folder `<vm_root>/<mount_id>/`; and
the replica it mounts holds a registration (target_agent.mount_registry) that protects the point, pauses
replication (FAILOVER) or keeps the point's bytes while sessions go on (TEST). See docs/target-agent.md,
"Mounts".

Write-ahead, so a crash at any step leaves a mount that MountPoint with the same id finishes and UnmountPoint
removes: the record `creating` and the registration (protection only) first, then the folder and its
files, the chain's blocks copied, the registration's copy-on-write switched on, the pending rollback
file's blocks copied, and the record `mounted` last. Unmount: the record `removing`, the registration
removed, the folder removed, the record removed.

LAYER layout, per disk: `<disk>.base` a hard link of the replica's data file, `<disk>.point` the point
store (the point's bytes of every block the replica no longer holds as the point had it), `<disk>.top` the
writable store, `<disk>.layer` the descriptor (vmrepl.disk.layer). VHDX layout: the replica's VHDX itself
(a hard link) for a failover to the newest point of a VHDX replica at rest, else the point copied to a new
dynamic VHDX (its allocated blocks only).
"""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from target_agent import mount_registry, replica, restore_points, rollback
from target_agent.datastore import Datastore
from target_agent.mount_registry import FAILOVER, TEST, Registration
from target_agent.points import PointDisk, find_point, open_point_disk
from target_agent.replica import DiskGuard
from vmrepl.block import is_zero
from vmrepl.disk.base import create_writer
from vmrepl.disk.fileio import atomic_write, link, make_dirs, read_bytes, remove, remove_tree, rename
from vmrepl.disk.layer import ExtentStore, create_layer, flatten_layer, read_descriptor
from vmrepl.disk.vhdx_writer import LOGICAL_SECTOR
from vmrepl.domain import DiskFormat
from vmrepl.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, PathError
from vmrepl.extent import MiB
from vmrepl.names import check_name

LAYER, VHDX = "layer", "vhdx"
CREATING, MOUNTED, FLATTENING, FLATTENED, REMOVING = "creating", "mounted", "flattening", "flattened", "removing"
STATES = (CREATING, MOUNTED, FLATTENING, FLATTENED, REMOVING)
RECORD_FORMAT = 1
_MOUNT_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")
_COPY_RUN = 16 * MiB
Guards = Callable[[Path], DiskGuard]


@dataclass(kw_only=True)
class MountDisk:
    disk_id: str
    path: str  # relative to the mount's folder
    format: str  # a DiskFormat value
    size: int
    base_format: str = ""  # the base's (the replica file's) format: a flattened LAYER disk's format
    copy_ino: int = 0  # VHDX layout: the inode of the point's copy once whole (what a later attempt keeps)


@dataclass(kw_only=True)
class MountRecord:
    mount_id: str
    replica_path: str
    point_id: str  # the point mounted (resolved: never "")
    requested_point_id: str  # as MountPoint named it ("": the newest then)
    kind: str  # FAILOVER or TEST
    layout: str  # LAYER or VHDX
    state: str
    create_time: float
    folder: str  # absolute
    disks: list[MountDisk] = field(default_factory=list)
    bytes_copied: int = 0  # VHDX copies; a LAYER mount's are its point stores' bytes


@dataclass(frozen=True)
class MountSettings:
    vm_root: Path | None
    vm_root_host_path: str = ""


def check_mount_id(mount_id: str) -> str:
    if not mount_id or len(mount_id) > 64 or not set(mount_id) <= _MOUNT_ID_CHARS:
        raise InvalidArgument("mount_id", f"{mount_id[:80]!r} is not letters, digits, '-' and '_' (1 to 64)")
    return mount_id


def require_vm_root(settings: MountSettings) -> Path:
    if settings.vm_root is None:
        raise FailedPrecondition("this target has no vm_root setting: it mounts no restore point (set vm_root)")
    make_dirs(settings.vm_root)
    return Path(os.path.realpath(settings.vm_root))


_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def _mount_lock(mount_id: str) -> threading.Lock:
    """One per mount id in the process: calls on one mount run one at a time (taken before a VM's lock)."""
    with _locks_guard:
        return _locks.setdefault(mount_id, threading.Lock())


# ---- records ----------------------------------------------------------------------------------------


def _record_path(ds: Datastore, mount_id: str) -> Path:
    return ds.mounts_dir / f"{mount_id}.json"


def _records_dir(ds: Datastore) -> Path:
    """`.mounts/` of the datastore root, never through a link planted in its place."""
    if ds.mounts_dir.is_symlink():
        raise FailedPrecondition(f"{ds.mounts_dir} is a symbolic link: move the folder itself back in place")
    return ds.mounts_dir


def save_record(ds: Datastore, rec: MountRecord) -> None:
    make_dirs(_records_dir(ds))
    doc = asdict(rec) | {"format": RECORD_FORMAT}
    atomic_write(_record_path(ds, rec.mount_id), json.dumps(doc, indent=1).encode())


def load_record(ds: Datastore, mount_id: str) -> MountRecord | None:
    _records_dir(ds)
    path = _record_path(ds, mount_id)
    if not os.path.lexists(path):
        return None
    try:
        raw = json.loads(read_bytes(path, follow_links=False).decode("utf-8"))
        if not isinstance(raw, dict) or raw.pop("format", None) != RECORD_FORMAT:
            raise ValueError("not a mount record of a format this target reads")
        raw["disks"] = [MountDisk(**d) for d in raw.get("disks", [])]
        rec = MountRecord(**raw)
        _check_record(rec, mount_id)
    except (OSError, ValueError, TypeError, PathError) as e:
        raise FailedPrecondition(f"mount record {path.name} is damaged: {e}") from e
    return rec


def _check_record(rec: MountRecord, mount_id: str) -> None:
    if rec.mount_id != mount_id or rec.state not in STATES or rec.kind not in (FAILOVER, TEST):
        raise ValueError("its id, state or kind is not valid")
    if rec.layout not in (LAYER, VHDX) or not isinstance(rec.replica_path, str):
        raise ValueError("its layout or replica path is not valid")
    check_name("point_id", rec.point_id)
    folder = Path(rec.folder)
    if not folder.is_absolute() or folder.name != mount_id or ".." in folder.parts:
        raise ValueError("its folder is not the mount's")
    for d in rec.disks:
        check_name("disk_id", d.disk_id)
        check_name("path", d.path)
        DiskFormat(d.format)
        if type(d.size) is not int or d.size < 0 or type(d.copy_ino) is not int:
            raise ValueError(f"disk {d.disk_id}'s size or copy is not a number")


def list_records(ds: Datastore, replica_path: str = "") -> list[MountRecord]:
    folder = _records_dir(ds)
    if not folder.is_dir():
        return []
    out = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.endswith(".json"):
            rec = load_record(ds, entry.name[: -len(".json")])
            if rec is not None and (not replica_path or rec.replica_path == replica_path):
                out.append(rec)
    return out


def host_folder(settings: MountSettings, rec: MountRecord) -> str:
    base = settings.vm_root_host_path
    if not base:
        return ""
    sep = "\\" if "\\" in base or (len(base) > 1 and base[1] == ":") else "/"
    return base.rstrip("\\/") + sep + rec.mount_id


def bytes_copied(rec: MountRecord) -> int:
    """What materialising the point copied, and copy-on-write since: the point stores' bytes (LAYER)."""
    if rec.layout != LAYER or rec.state in (FLATTENED, REMOVING):
        return rec.bytes_copied
    total = 0
    for d in rec.disks:
        store = ExtentStore(Path(rec.folder), f"{d.disk_id}.point", size=d.size)
        if store.exists():
            total += sum(e.length for e in store.extents())
    return total


# ---- mount ------------------------------------------------------------------------------------------


def mount(
    ds: Datastore,
    settings: MountSettings,
    guards: Guards,
    *,
    replica_path: str,
    point_id: str,
    mount_id: str,
    kind: str,
    layout: str,
) -> MountRecord:
    """Make the mount, or finish one a crash cut short; the same call again answers the mount as it is."""
    vm_root = require_vm_root(settings)
    with _mount_lock(mount_id):
        rec = load_record(ds, mount_id)
        if rec is not None:
            _check_same(rec, replica_path=replica_path, point_id=point_id, kind=kind, layout=layout)
            if Path(rec.folder).parent != vm_root:
                raise FailedPrecondition(f"mount {mount_id}'s record names {rec.folder}, which is not in vm_root")
            if rec.state != CREATING:
                return rec
        vm_dir = ds.vm_dir(replica_path)
        with restore_points.vm_lock(vm_dir):
            if rec is None:
                rec = _begin(
                    ds,
                    vm_dir,
                    vm_root,
                    replica_path=replica_path,
                    point_id=point_id,
                    mount_id=mount_id,
                    kind=kind,
                    layout=layout,
                )
            _build(ds, vm_dir, rec, guards)
            rec.state = MOUNTED
            save_record(ds, rec)
    return rec


def _check_same(rec: MountRecord, *, replica_path: str, point_id: str, kind: str, layout: str) -> None:
    if rec.state == REMOVING:
        raise FailedPrecondition(f"mount {rec.mount_id} is being removed: UnmountPoint it, then mount again")
    same = (rec.replica_path, rec.kind, rec.layout) == (replica_path, kind, layout)
    if not same or (point_id and point_id != rec.point_id):
        raise AlreadyExists(
            f"mount {rec.mount_id} exists for replica {rec.replica_path}, point {rec.point_id}, {rec.kind}, "
            f"{rec.layout}: choose another mount id"
        )


def _begin(
    ds: Datastore,
    vm_dir: Path,
    vm_root: Path,
    *,
    replica_path: str,
    point_id: str,
    mount_id: str,
    kind: str,
    layout: str,
) -> MountRecord:
    """Check what the mount needs and write its record and registration, before any file is made."""
    point = find_point(vm_dir, point_id)
    regs = mount_registry.registrations(vm_dir)
    if kind == FAILOVER and any(r.kind == FAILOVER for r in regs):
        mount_registry.refuse_failover(vm_dir)
    folder = vm_root / mount_id
    if os.path.lexists(folder):
        raise AlreadyExists(f"{folder} exists and is no mount of this target: choose another mount id")
    disks = []
    for d in point.disks:
        if layout == VHDX and d.disk_size % LOGICAL_SECTOR:
            raise FailedPrecondition(
                f"disk {d.disk_id} has {d.disk_size} bytes, not a multiple of {LOGICAL_SECTOR}: no VHDX holds it "
                "(mount it with the LAYER layout)"
            )
        path = f"{d.disk_id}.layer" if layout == LAYER else f"{d.disk_id}.vhdx"
        fmt = DiskFormat.LAYER.value if layout == LAYER else VHDX
        disks.append(
            MountDisk(disk_id=d.disk_id, path=path, format=fmt, size=d.disk_size, base_format=d.replica_format)
        )
    rec = MountRecord(
        mount_id=mount_id,
        replica_path=replica_path,
        point_id=point.id,
        requested_point_id=point_id,
        kind=kind,
        layout=layout,
        state=CREATING,
        create_time=time.time(),
        folder=str(folder),
        disks=disks,
    )
    save_record(ds, rec)
    mount_registry.register(vm_dir, _registration(rec, cow=False))
    return rec


def _registration(rec: MountRecord, *, cow: bool) -> Registration:
    stores = {d.disk_id: f"{d.disk_id}.point" for d in rec.disks} if rec.layout == LAYER else {}
    sizes = {d.disk_id: d.size for d in rec.disks} if rec.layout == LAYER else {}
    return Registration(
        mount_id=rec.mount_id,
        point_id=rec.point_id,
        kind=rec.kind,
        cow=cow,
        folder=rec.folder,
        stores=stores,
        sizes=sizes,
    )


def _folder(rec: MountRecord) -> Path:
    """The mount's folder, made (durably) if missing; a link or a file planted in its place is refused."""
    folder = Path(rec.folder)
    try:
        st = os.lstat(folder)
    except FileNotFoundError:
        make_dirs(folder)
        return folder
    if not stat.S_ISDIR(st.st_mode):
        raise FailedPrecondition(f"{folder} is not a folder (a link or a file is in its place): refused")
    return folder


def _build(ds: Datastore, vm_dir: Path, rec: MountRecord, guards: Guards) -> None:
    """The mount's files (call under the VM's lock: no restore point is committed, deleted or prepared for
    meanwhile, so the chain each PointDisk opened stays the chain; streams may go on writing)."""
    folder = _folder(rec)
    opened: list[PointDisk] = []
    try:
        for d in rec.disks:
            opened.append(open_point_disk(vm_dir, rec.point_id, d.disk_id))
        copied: list[set[int]] = []
        for d, pd in zip(rec.disks, opened, strict=True):
            disk_dir = vm_dir / "disks" / d.disk_id
            if rec.layout == LAYER:
                copied.append(_layer_disk(folder, disk_dir, d, pd))
            else:
                rec.bytes_copied += _vhdx_disk(folder, disk_dir, d, pd, rec=rec, guard=guards(disk_dir))
                save_record(ds, rec)  # the copy's inode: a later attempt keeps that file only
        if rec.layout == LAYER:
            if rec.kind == TEST:  # from now on every overwrite of a block saves its old bytes here first
                mount_registry.register(vm_dir, _registration(rec, cow=True))
            for d, pd, done in zip(rec.disks, opened, copied, strict=True):
                disk_dir = vm_dir / "disks" / d.disk_id
                with guards(disk_dir).lock:  # the stores' one writer (a stream's copy-on-write holds it too)
                    _copy_blocks(pd, _point_store(folder, d), [b for b in pd.saved_blocks() if b not in done])
    finally:
        for pd in opened:
            pd.close()


def _point_store(folder: Path, d: MountDisk) -> ExtentStore:
    return ExtentStore(folder, f"{d.disk_id}.point", size=d.size)


def _layer_disk(folder: Path, disk_dir: Path, d: MountDisk, pd: PointDisk) -> set[int]:
    """The disk's base link, stores and descriptor, and the point's bytes of the chain's blocks copied."""
    st = replica.load_state(disk_dir)
    data = replica.data_file(disk_dir, st.replica_format)
    base = f"{d.disk_id}.base"
    _link_base(data, folder / base)
    if not os.path.lexists(folder / d.path):  # no layer yet: what is there is a cut attempt's, or planted
        for store in ("point", "top"):
            for suffix in (".raw", ".map"):
                remove(folder / f"{d.disk_id}.{store}{suffix}")  # a link goes, never what it points at
    create_layer(  # an earlier attempt's layer is answered as it is (its point store keeps what it copied)
        folder,
        d.disk_id,
        size=d.size,
        base=base,
        base_format=DiskFormat(d.base_format or st.replica_format),
        stores=[f"{d.disk_id}.point", f"{d.disk_id}.top"],
    )
    _check_stores(folder, d, pd)
    blocks = pd.saved_blocks()
    _copy_blocks(pd, _point_store(folder, d), blocks)
    return set(blocks)


def _check_stores(folder: Path, d: MountDisk, pd: PointDisk) -> None:
    """An earlier attempt's stores hold the point's bytes and nothing else: no VM writes a mount before it is
    mounted. Bytes written into them meanwhile (the folder is on the failover host) are refused, never booted."""
    top = ExtentStore(folder, f"{d.disk_id}.top", size=d.size)
    if top.extents():
        raise FailedPrecondition(f"{top.map_path} holds writes, but no VM ran on the mount yet: UnmountPoint it")
    store = _point_store(folder, d)
    for e in store.extents():
        for pos in range(e.offset, e.end, _COPY_RUN):
            n = min(_COPY_RUN, e.end - pos)
            held, point = bytearray(n), bytearray(n)
            store.read_into(memoryview(held), pos)
            pd.read_into(memoryview(point), pos)
            if held != point:
                raise FailedPrecondition(
                    f"{store.map_path} holds bytes at {pos} that are not the point's: UnmountPoint the mount"
                )


def _link_base(data: Path, base: Path) -> None:
    """`base` a hard link of the replica's data file; whatever else is in its place (an earlier attempt's
    link is kept, a planted file or link is removed, never followed)."""
    want = os.stat(data)
    try:
        have = os.lstat(base)
    except FileNotFoundError:
        have = None
    if have is not None and stat.S_ISREG(have.st_mode) and (have.st_dev, have.st_ino) == (want.st_dev, want.st_ino):
        return
    if have is not None:
        remove(base)
    try:
        link(data, base)
    except OSError as e:
        if e.errno == 18:  # EXDEV
            raise FailedPrecondition(
                f"vm_root ({base.parent.parent}) is on another file system than the datastore: a mount hard-links "
                "the replica's data file (put vm_root on the datastore's file system)"
            ) from e
        raise


def _copy_blocks(pd: PointDisk, store: ExtentStore, blocks: list[int]) -> None:
    """The point's bytes of `blocks` into `store`, first writer wins (bytes it holds are the point's too)."""
    bs, size = pd.block_size, pd.size
    run: list[int] = []
    for b in [*blocks, -1]:
        if run and (b != run[-1] + 1 or len(run) * bs >= _COPY_RUN):
            lo, hi = run[0] * bs, min(size, (run[-1] + 1) * bs)
            buf = bytearray(hi - lo)
            pd.read_into(memoryview(buf), lo)
            store.write_missing(lo, buf)
            run = []
        if b >= 0:
            run.append(b)


def _vhdx_disk(folder: Path, disk_dir: Path, d: MountDisk, pd: PointDisk, *, rec: MountRecord, guard: DiskGuard) -> int:
    """The disk as a VHDX for Hyper-V; returns the bytes copied (0 for the replica's own VHDX)."""
    final = folder / d.path
    st = replica.load_state(disk_dir)
    newest = restore_points.list_points(disk_dir.parent.parent)[-1].id == rec.point_id
    if rec.kind == FAILOVER and newest and st.replica_format == VHDX:
        with guard.lock:  # the FAILOVER registration stops writers; one already inside a batch ends first
            # No session over the point at all (a prepared one may have resized the file already).
            at_rest = not os.path.lexists(disk_dir / replica.ROLLBACK_DIR / rollback.PENDING) and st.disk_size == d.size
        if at_rest:  # Hyper-V makes its own differencing disk over it; no session writes it meanwhile
            _link_base(replica.data_file(disk_dir, VHDX), final)
            return 0
    have = _lstat(final)
    if have is not None:
        if stat.S_ISREG(have.st_mode) and have.st_nlink == 1 and have.st_ino == d.copy_ino:
            return 0  # an earlier attempt's copy (renamed into place once complete), not one planted there
        remove(final)
    copied = _copy_to_vhdx(pd, final)
    d.copy_ino = os.lstat(final).st_ino
    return copied


def _copy_to_vhdx(pd: PointDisk, final: Path) -> int:
    """The point's allocated blocks (zeros left out) into a new dynamic VHDX, renamed into place when whole."""
    tmp = final.with_name(final.name + ".tmp")
    remove(tmp)
    writer = create_writer(DiskFormat.VHDX, tmp, size=pd.size, block_size=max(pd.block_size, MiB))
    copied = 0
    try:
        bs = pd.block_size
        buf = bytearray(bs)
        for e in pd.allocated_extents():
            for b in range(e.offset // bs, -(-e.end // bs)):
                n = min(bs, pd.size - b * bs)
                view = memoryview(buf)[:n]
                pd.read_into(view, b * bs)
                if not is_zero(buf[:n]):
                    writer.write(view, b * bs)
                    copied += n
        writer.flush()
    finally:
        writer.close()
    rename(tmp, final)
    return copied


# ---- unmount, flatten -------------------------------------------------------------------------------


def unmount(ds: Datastore, settings: MountSettings, guards: Guards, mount_id: str) -> MountRecord | None:
    """Remove the mount and everything written to it; None when there is none. A flattened mount's folder is
    a VM's own now: only its record goes."""
    with _mount_lock(mount_id):
        rec = load_record(ds, mount_id)
        if rec is None:
            return None
        if rec.state != FLATTENED:
            if rec.state != REMOVING:
                rec.state = REMOVING
                save_record(ds, rec)
            _unregister(ds, rec, guards)
            _remove_folder(settings, rec)
        remove(_record_path(ds, mount_id))
        return rec


def _unregister(ds: Datastore, rec: MountRecord, guards: Guards) -> None:
    try:
        vm_dir = ds.vm_dir(rec.replica_path)
    except PathError:
        return
    if not vm_dir.is_dir():
        return  # the replica is gone (and its registrations with it)
    with restore_points.vm_lock(vm_dir):
        mount_registry.unregister(vm_dir, rec.mount_id)
        for d in rec.disks:  # a stream inside a batch may still copy into the stores: let it end first
            with guards(vm_dir / "disks" / d.disk_id).lock:
                pass


def _remove_folder(settings: MountSettings, rec: MountRecord) -> None:
    folder = Path(rec.folder)
    if settings.vm_root is not None and Path(os.path.realpath(settings.vm_root)) != folder.parent:
        raise FailedPrecondition(f"mount {rec.mount_id}'s folder {folder} is not under vm_root: remove it by hand")
    try:
        st = os.lstat(folder)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        remove_tree(folder)
    else:
        remove(folder)  # a link planted in its place goes, never what it points at


def flatten(ds: Datastore, guards: Guards, mount_id: str) -> MountRecord:
    """Permanent failover: each disk merged into its base (the layer reads the base alone), so the folder
    stands alone. The base is the replica's data file: the replica is marked given away first."""
    with _mount_lock(mount_id):
        rec = load_record(ds, mount_id)
        if rec is None:
            raise NotFound(f"mount {mount_id} does not exist")
        if rec.state == FLATTENED:
            return rec
        if rec.kind != FAILOVER:
            raise FailedPrecondition(f"mount {mount_id} is a test failover's: it is discarded, never made permanent")
        if rec.state not in (MOUNTED, FLATTENING):
            raise FailedPrecondition(f"mount {mount_id} is {rec.state}: finish it with MountPoint first")
        vm_dir = ds.vm_dir(rec.replica_path)
        if rec.state == MOUNTED:
            rec.state = FLATTENING
            save_record(ds, rec)
        if vm_dir.is_dir():
            with restore_points.vm_lock(vm_dir):
                restore_points.give_away(vm_dir, mount_id)
        if rec.layout == LAYER:
            for d in rec.disks:
                identity = _check_base(Path(rec.folder), vm_dir / "disks" / d.disk_id, d)
                _flatten_disk(Path(rec.folder), d, identity)
        rec.state = FLATTENED
        save_record(ds, rec)
        return rec


def _check_base(folder: Path, disk_dir: Path, d: MountDisk) -> tuple[int, int] | None:
    """The layer merges into the base the mount linked: the replica's data file. The folder is a file host's
    VM folder, which others may write: a descriptor naming another file, or a base swapped for a hard link of
    another file (another replica's data, on the same file system), would have the merge write that file."""
    if d.format != DiskFormat.LAYER.value:
        return None  # flattened by an earlier attempt
    base = read_descriptor(folder / d.path).base
    if base != f"{d.disk_id}.base":
        raise FailedPrecondition(f"{folder / d.path} names {base} as its base, not the mount's: refused")
    data = replica.data_file(disk_dir, replica.load_state(disk_dir).replica_format)
    want, have = os.lstat(data), _lstat(folder / base)
    if have is None or not stat.S_ISREG(have.st_mode) or (have.st_dev, have.st_ino) != (want.st_dev, want.st_ino):
        raise FailedPrecondition(
            f"{folder / base} is not the replica's data file the mount linked (replaced in the VM folder): refused"
        )
    return want.st_dev, want.st_ino


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _flatten_disk(folder: Path, d: MountDisk, identity: tuple[int, int] | None) -> None:
    if d.format != DiskFormat.LAYER.value:
        return  # flattened by an earlier attempt
    plain = flatten_layer(folder / d.path, base_identity=identity)
    d.path = plain.name
    d.format = DiskFormat(d.base_format or DiskFormat.RAW.value).value
