"""The file-backed provider: a host is a folder, a VM a subfolder with a `vm.toml` manifest.

It behaves like Hyper-V where replication can see it:

* A checkpoint freezes the disks: while it exists, writes made through the
  provider (`write`, used by `vmrepl lab write`) go to an overlay per disk,
  and the base image is what the proxy reads. Removing the checkpoint merges
  the overlay back into the base; the merge is idempotent, so a crash in the
  middle is finished by the next removal.
* Change tracking: every write through the provider is logged with a
  sequence number. A checkpoint's reference is the sequence at its creation,
  so `changed_ranges(cp, disk, since=earlier_reference)` answers like RCT's
  `GetVirtualDiskChanges`. Writes made to the images by other means are not
  tracked — the situation sampled verification exists for.

* Failover: a disk may be a layer disk (vmrepl/disk/layer.py: a restore point's image with stores on
  top), written in its top store; `register_vm` makes a VM of a folder the target agent filled, power
  is `.vmrepl/power` (running | off), and a VM that is off writes nothing. A permanent failover's
  `merge_vm_disks`, once the target flattened the layers, has vm.toml name the plain images.

VM folders may be written by others than the operator, so every file in one is opened without following
symbolic links, inside the host folder (safefs), a checkpoint record is used only with the provider's
seal (filejournal), and looking VMs up creates nothing.

Layout of a VM folder (docs/file-provider.md):
    vm.toml                  name, id, disks (paths relative to the folder)
    <disk images>
    .vmrepl/lock             serialises writers across processes
    .vmrepl/changes.log      one JSON line per write: seq, disk, offset, length
    .vmrepl/checkpoint.json  the sealed checkpoint record: id, created_at, reference, state (active | merging)
    .vmrepl/overlay/<disk>.raw and .map   bytes written under the checkpoint, and where (an ExtentStore)
    .vmrepl/power            running | off (absent: running)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from pydantic import ValidationError

from vmrepl.disk import open_reader
from vmrepl.disk.layer import FLATTENED, ExtentStore, LayerDisk, open_layer, read_descriptor
from vmrepl.domain import DiskFormat, PowerState
from vmrepl.errors import DiskError, FailedPrecondition, InvalidArgument, NotFound, VmreplError
from vmrepl.extent import Extent, merge
from vmrepl.names import check_name
from vmrepl.providers.base import (
    CRASH_CONSISTENT,
    Checkpoint,
    CheckpointRequest,
    DiskInCheckpoint,
    DiskInfo,
    Provider,
    Untracked,
    VmInfo,
    VmSpec,
)
from vmrepl.providers.filejournal import CheckpointRecord, HostKey
from vmrepl.providers.filevms import (
    MANIFEST,
    MANIFEST_LIMIT,
    DiskManifest,
    VmIndex,
    VmManifest,
    load_manifest,
    manifest_text,
    parse_manifest,
    write_manifest,
)
from vmrepl.providers.safefs import Folder

__all__ = [
    "DiskManifest",
    "FileHostProvider",
    "FileVm",
    "VmManifest",
    "load_manifest",
    "parse_manifest",
    "write_manifest",
]

STATE_DIR = ".vmrepl"
OVERLAY_DIR = "overlay"
CHECKPOINT = "checkpoint.json"
CHANGES = "changes.log"
LOCK = "lock"
POWER = "power"
_COPY_CHUNK = 4 << 20
_RECORD_LIMIT = 64 << 10
_LOG_LIMIT = 1 << 30
T = TypeVar("T")
_REGISTERING = threading.Lock()


def _datasync(fd: int) -> None:
    getattr(os, "fdatasync", os.fsync)(fd)


@contextlib.contextmanager
def _shown(fd_path: Path, real: Path) -> Iterator[None]:
    """Errors raised inside name `real` where they say `fd_path` (a folder opened as /dev/fd/N)."""
    try:
        yield
    except VmreplError as e:
        text = str(e)
        if str(fd_path) not in text:
            raise
        raise _renamed(e, str(fd_path), str(real)) from e


def _renamed(e: VmreplError, old: str, new: str) -> VmreplError:
    if isinstance(e, InvalidArgument):
        return type(e)(e.field, e.description.replace(old, new))
    try:
        return type(e)(str(e).replace(old, new))
    except TypeError:  # an error class with other arguments: as it was
        return e


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


class FileVm:
    """One VM folder; every method blocks (the provider runs them in threads)."""

    def __init__(self, *, root: Path, folder: str, manifest: VmManifest, host: str, key: HostKey) -> None:
        self.root = root
        self.folder = folder
        self.dir = root / folder
        self.state = self.dir / STATE_DIR
        self.manifest = manifest
        self.host = host
        self._key = key

    # -- folders, opened without following symbolic links ---------------------------------------

    @contextlib.contextmanager
    def _vm_dir(self) -> Iterator[Folder]:
        with Folder.open(self.root) as top, top.child(self.folder) as d:
            yield d

    @contextlib.contextmanager
    def _state(self) -> Iterator[Folder]:
        """The state folder, made if missing: only for actions that change state, never for lookups."""
        with self._vm_dir() as d, d.child(STATE_DIR, create=True) as s:
            yield s

    @contextlib.contextmanager
    def _state_if_any(self) -> Iterator[Folder | None]:
        with self._vm_dir() as d:
            s = d.maybe_child(STATE_DIR)
            if s is None:
                yield None
                return
            with s:
                yield s

    # -- disks ---------------------------------------------------------------------------------------

    def _disk(self, disk_id: str) -> DiskManifest:
        for d in self.manifest.disks:
            if d.id == disk_id:
                return d
        raise NotFound(f"VM {self.manifest.name} has no disk {disk_id!r}")

    def _open_image(self, d: Folder, disk_id: str, *, writable: bool = False) -> int:
        parts = self._disk(disk_id).path.split("/")
        with d.descend(parts[:-1]) as where:
            try:
                # A written image must have one link: another would make it another file's too (a failed-over
                # VM's base is the replica's data file; vm.toml could name it as a raw disk).
                return where.open_file(parts[-1], writable=writable, own=writable)
            except FileNotFoundError as e:
                raise FailedPrecondition(f"disk {disk_id}: {where.path / parts[-1]} does not exist") from e

    def image(self, disk_id: str) -> Path:
        """The disk's image, checked: a regular file reached through real folders inside the VM folder."""
        with self._vm_dir() as d:
            os.close(self._open_image(d, disk_id))
        return self.dir / self._disk(disk_id).path

    @contextlib.contextmanager
    def _layer(self, d: Folder, disk_id: str, *, writable: bool = False) -> Iterator[LayerDisk]:
        """A layer disk, its folder reached without following symbolic links (its files are opened by
        name in that folder's descriptor, /dev/fd/N; errors name the real folder)."""
        parts = self._disk(disk_id).path.split("/")
        with d.descend(parts[:-1]) as where, _shown(Path(f"/dev/fd/{where.fd}"), where.path):
            disk = open_layer(Path(f"/dev/fd/{where.fd}") / parts[-1], writable=writable)
            try:
                yield disk
            finally:
                disk.close()

    def _size(self, d: Folder, disk_id: str) -> int:
        if self._disk(disk_id).format is DiskFormat.LAYER:
            with self._layer(d, disk_id) as layer:
                return layer.size
        fd = self._open_image(d, disk_id)
        try:
            fmt = self._disk(disk_id).format
            if fmt == "raw":
                return os.fstat(fd).st_size
            with open_reader(fmt, Path(f"/dev/fd/{fd}")) as r:  # the very file checked, opened again
                return r.size
        finally:
            os.close(fd)

    def size(self, disk_id: str) -> int:
        with self._vm_dir() as d:
            return self._size(d, disk_id)

    def info(self) -> VmInfo:
        with self._vm_dir() as d:
            disks = tuple(
                DiskInfo(d_.id, str(self.dir / d_.path), d_.format, self._size(d, d_.id)) for d_ in self.manifest.disks
            )
        power = self.power()
        return VmInfo(self.manifest.id, self.manifest.name, self.host, disks, state=power.value, power=power)

    def configuration(self) -> bytes:
        with self._vm_dir() as d:
            data = d.read(MANIFEST, limit=MANIFEST_LIMIT)
        if data is None:
            raise NotFound(f"{self.dir} has no {MANIFEST}")
        return data

    # -- checkpoints ---------------------------------------------------------------------------

    def _record(self, s: Folder | None) -> CheckpointRecord | None:
        data = s.read(CHECKPOINT, limit=_RECORD_LIMIT, own=True) if s is not None else None
        return None if data is None else self._key.open(data, where=self.state / CHECKPOINT, vm_id=self.manifest.id)

    def _save(self, s: Folder, record: CheckpointRecord) -> None:
        s.replace(CHECKPOINT, self._key.seal(record))

    def _as_checkpoint(self, record: CheckpointRecord) -> Checkpoint:
        with self._vm_dir() as d:
            disks = tuple(
                DiskInCheckpoint(x.id, str(self.dir / x.path), x.format, self._size(d, x.id))
                for x in self.manifest.disks
            )
        return Checkpoint(record.id, self.manifest.id, record.created_at, f"seq:{record.reference}", disks)

    def create_checkpoint(self) -> Checkpoint:
        with self._state() as s, s.lock(LOCK):
            current = self._record(s)
            if current is not None and current.state == "merging":
                self._merge(s)
            elif current is not None:
                raise FailedPrecondition(
                    f"VM {self.manifest.name} already has checkpoint {current.id}; remove it first"
                )
            with s.child(OVERLAY_DIR, create=True) as overlay:
                self._drop_overlays(overlay)  # left by no checkpoint of ours: never part of this one
            record = CheckpointRecord(
                vm_id=self.manifest.id,
                id=uuid.uuid4().hex,
                created_at=time.time(),
                reference=self._last_seq(s),
                state="active",
            )
            self._save(s, record)
        return self._as_checkpoint(record)

    def list_checkpoints(self) -> list[Checkpoint]:
        with self._state_if_any() as s:
            record = self._record(s)
        return [self._as_checkpoint(record)] if record is not None and record.state == "active" else []

    def remove_checkpoint(self, checkpoint_id: str) -> None:
        with self._state_if_any() as s:
            if s is None:
                return  # never had one: nothing to remove, and nothing is created to say so
            with s.lock(LOCK):
                record = self._record(s)
                if record is None:
                    return  # already removed: idempotent
                if record.id != checkpoint_id:
                    raise NotFound(f"VM {self.manifest.name} has no checkpoint {checkpoint_id}")
                if record.state != "merging":
                    self._save(s, record.model_copy(update={"state": "merging"}))
                self._merge(s)

    def _merge(self, s: Folder) -> None:
        """Copy every overlay into its base and make it durable, then drop the overlays (durably), then the
        record: a crash at any point leaves the record `merging`, and merging again gives the same disks."""
        overlay = s.maybe_child(OVERLAY_DIR)
        if overlay is not None:
            with overlay, self._vm_dir() as d:
                for disk in self.manifest.disks:
                    self._merge_disk(d, overlay, disk.id)
                self._drop_overlays(overlay)
        s.unlink(CHECKPOINT)
        s.sync()

    def _overlay(self, overlay: Folder, disk_id: str, size: int) -> ExtentStore:
        """The disk's overlay: the bytes written under the checkpoint and their map (a shared ExtentStore:
        vmrepl/disk/layer.py has its durability order and its torn-line rule), opened in the overlay
        folder's descriptor."""
        return ExtentStore(Path(f"/dev/fd/{overlay.fd}"), disk_id, size=size, shown=overlay.path)

    def _merge_disk(self, d: Folder, overlay: Folder, disk_id: str) -> None:
        store = self._overlay(overlay, disk_id, self._size(d, disk_id))
        extents = store.extents()
        if not extents:
            return
        with self._image_writer(d, disk_id) as write:
            buf = bytearray(_COPY_CHUNK)
            for e in extents:
                for pos in range(e.offset, e.end, _COPY_CHUNK):
                    view = memoryview(buf)[: min(_COPY_CHUNK, e.end - pos)]
                    store.read_into(view, pos)
                    write(pos, view)

    @contextlib.contextmanager
    def _image_writer(self, d: Folder, disk_id: str) -> Iterator[Callable[[int, memoryview | bytes], None]]:
        """A function writing the disk as the guest does; everything it wrote is durable once the block
        ends (a layer disk's writes, into its top store, are each durable at once)."""
        if self._disk(disk_id).format is DiskFormat.LAYER:
            with self._layer(d, disk_id, writable=True) as layer:
                yield layer.write
            return
        fd = self._open_image(d, disk_id, writable=True)
        try:
            yield lambda offset, data: _pwrite_all(fd, data, offset)
            _datasync(fd)
        finally:
            os.close(fd)

    def _drop_overlays(self, overlay: Folder) -> None:
        for disk in self.manifest.disks:
            for suffix in (".raw", ".map"):
                overlay.unlink(f"{disk.id}{suffix}")
        overlay.sync()

    # -- writes and change tracking ------------------------------------------------------------

    def _last_seq(self, s: Folder) -> int:
        line = s.last_line(CHANGES)
        if line is None:
            return 0
        try:
            return int(json.loads(line)["seq"])
        except (ValueError, KeyError, TypeError) as e:
            raise FailedPrecondition(f"the last entry of {self.state / CHANGES} is damaged") from e

    def write(self, disk_id: str, offset: int, data: bytes) -> None:
        """Write as the guest would: into the overlay while a checkpoint exists, else into the disk. Durable
        when it returns, as a guest's flushed write is. A VM that is off writes nothing."""
        if self._disk(disk_id).format not in (DiskFormat.RAW, DiskFormat.LAYER):
            raise FailedPrecondition(
                f"disk {disk_id} is {self._disk(disk_id).format}; the lab writes raw and layer disks only"
            )
        size = self.size(disk_id)
        if offset < 0 or offset + len(data) > size:
            raise InvalidArgument("offset", f"[{offset}, +{len(data)}) is outside disk {disk_id}")
        with self._state() as s, s.lock(LOCK):
            if self._power(s) is not PowerState.RUNNING:
                raise FailedPrecondition(f"VM {self.manifest.name} is off: start it first")
            record = self._record(s)
            if record is not None and record.state == "merging":
                self._merge(s)
                record = None
            # Logged, durably, before the data changes: a crash in between makes the tracker report a range
            # that did not change (harmless, it is sent again), never miss one that did.
            entry = {"seq": self._last_seq(s) + 1, "disk": disk_id, "offset": offset, "length": len(data)}
            s.append_line(CHANGES, json.dumps(entry).encode())
            if record is None:
                with self._vm_dir() as d, self._image_writer(d, disk_id) as write:
                    write(offset, data)
                return
            # Under a checkpoint the write goes to the overlay; the disk stays as the checkpoint froze it.
            with s.child(OVERLAY_DIR, create=True) as overlay:
                self._overlay(overlay, disk_id, size).write(offset, data)

    def read_current(self, disk_id: str, offset: int, length: int) -> bytes:
        """The disk as the guest sees it now: the disk, with the overlay on top."""
        buf = bytearray(length)
        with self._vm_dir() as d:
            size = self._size(d, disk_id)
            if self._disk(disk_id).format is DiskFormat.LAYER:
                with self._layer(d, disk_id) as layer:
                    layer.read_into(memoryview(buf), offset)
            else:
                fd = self._open_image(d, disk_id)
                try:
                    with open_reader(self._disk(disk_id).format, Path(f"/dev/fd/{fd}")) as r:
                        r.read_into(memoryview(buf), offset)
                finally:
                    os.close(fd)
        with self._state_if_any() as s:
            overlay = s.maybe_child(OVERLAY_DIR) if s is not None else None
            if overlay is not None:
                with overlay:
                    self._overlay(overlay, disk_id, size).read_into(memoryview(buf), offset)
        return bytes(buf)

    # -- power and unregistering -------------------------------------------------------------------

    def _power(self, s: Folder | None) -> PowerState:
        data = s.read(POWER, limit=64, own=True) if s is not None else None
        if data is None:
            return PowerState.RUNNING  # as before power existed: a VM folder is a running VM
        word = data.decode("utf-8", errors="replace").strip()
        if word not in (PowerState.RUNNING, PowerState.OFF):
            raise FailedPrecondition(f"{self.state / POWER} says {word!r}, neither running nor off: refused")
        return PowerState(word)

    def power(self) -> PowerState:
        with self._state_if_any() as s:
            return self._power(s)

    def set_power(self, power: PowerState) -> None:
        """Durable when it returns; taken under the VM's lock, so no write is under way once it is off."""
        with self._state() as s, s.lock(LOCK):
            s.replace(POWER, f"{power.value}\n".encode())

    def unregister(self) -> None:
        """The folder stops being a VM: writes made under a checkpoint merged into the disks first, then
        vm.toml removed (durably), then the state folder. The disk files stay (the target's to remove)."""
        with self._state() as s, s.lock(LOCK):
            if self._power(s) is not PowerState.OFF:
                raise FailedPrecondition(f"VM {self.manifest.name} is running: stop it before unregistering it")
            if self._record(s) is not None:
                self._merge(s)
        with self._vm_dir() as d:
            d.unlink(MANIFEST)
            d.sync()
            d.remove_tree(STATE_DIR)

    # -- permanent failover: the VM on its plain images -------------------------------------------------

    def stand_alone(self) -> None:
        """After the target's FlattenMount merged each layer disk into its base: vm.toml names each base (the
        plain image, in its format) instead of the layer's descriptor, durably, then the flattened descriptors
        go. Idempotent: a crash between the two leaves vm.toml naming the bases, and descriptors that read
        those bases alone, which the next call removes. A layer not flattened yet is refused, unchanged."""
        with self._state() as s, s.lock(LOCK):
            if self._record(s) is not None:
                raise FailedPrecondition(
                    f"VM {self.manifest.name} has a checkpoint: remove it before the VM stands on its own images"
                )
            with self._vm_dir() as d:
                disks = [self._plain_disk(d, x) for x in self.manifest.disks]
                if disks != self.manifest.disks:
                    self.manifest = self.manifest.model_copy(update={"disks": disks})
                    d.replace(MANIFEST, manifest_text(self.manifest))  # durable (file, then folder)
                for x in disks:
                    self._drop_flattened_descriptors(d, x.path)

    def _plain_disk(self, d: Folder, disk: DiskManifest) -> DiskManifest:
        if disk.format is not DiskFormat.LAYER:
            return disk
        with self._layer(d, disk.id) as layer:
            if not layer.flattened:
                raise FailedPrecondition(
                    f"disk {disk.id}: the layer {self.dir / disk.path} is not flattened (the target agent's "
                    "FlattenMount merges it first): the VM still needs it"
                )
            base, base_format = layer.descriptor.base, layer.descriptor.base_format
        return DiskManifest(id=disk.id, path="/".join([*disk.path.split("/")[:-1], base]), format=base_format)

    def _drop_flattened_descriptors(self, d: Folder, image: str) -> None:
        """Layer descriptors beside `image` that are flattened into it: they read it alone, nothing needs
        them. Any other file is left as it is."""
        parts = image.split("/")
        with d.descend(parts[:-1]) as where:
            for entry in where.names():
                if not entry.name.endswith(".layer") or not entry.is_file(follow_symlinks=False):
                    continue
                try:
                    desc = read_descriptor(Path(f"/dev/fd/{where.fd}") / entry.name)
                except FailedPrecondition:
                    continue  # not a descriptor of ours: not ours to remove
                if desc.state == FLATTENED and desc.base == parts[-1]:
                    where.unlink(entry.name)
            where.sync()

    def changed_ranges(self, checkpoint: Checkpoint, disk_id: str, since: str) -> list[Extent] | Untracked:
        try:
            lo = int(since.removeprefix("seq:"))
            hi = int(checkpoint.reference.removeprefix("seq:"))
        except ValueError:
            return Untracked(f"reference {since!r} is not one of this host's change-log positions")
        if not since.startswith("seq:") or lo > hi:
            return Untracked(f"reference {since!r} is not before the checkpoint's")
        with self._state_if_any() as s:
            lines = s.lines(CHANGES, limit=_LOG_LIMIT) if s is not None else None
        out = []
        for line in lines or []:
            try:
                e = json.loads(line)
                seq, disk, start, length = int(e["seq"]), e["disk"], int(e["offset"]), int(e["length"])
            except (ValueError, KeyError, TypeError):
                # A damaged log cannot say what changed: the caller compares digests.
                return Untracked("the VM's change log is damaged")
            if lo < seq <= hi and disk == disk_id:
                out.append(Extent(start, length))
        return merge(out)


class FileHostProvider(Provider):
    """Every subfolder of `root` holding a vm.toml is a VM."""

    def __init__(self, root: Path, *, host: str = "localhost") -> None:
        self.root = root
        self.host = host
        self.index = VmIndex(root)
        self._key = HostKey(root)

    def vm(self, ref: str) -> FileVm:
        f = self.index.find(ref)
        return FileVm(root=self.root, folder=f.name, manifest=f.vm, host=self.host, key=self._key)

    def problems(self) -> dict[str, str]:
        """Folders that hold no usable VM, and why."""
        return {f.name: str(f.error) for f in self.index.folders() if f.error is not None}

    def check_unique_ids(self) -> None:
        self.index.check_unique_ids()

    def _list(self) -> list[VmInfo]:
        out = []
        for f in self.index.folders():
            if f.manifest is None:
                continue  # see problems()
            try:
                out.append(self.vm(f.vm.id).info())
            except VmreplError:
                continue  # its id shared or a disk unusable: get_vm says why
        return out

    async def _run(self, fn: Callable[[], T]) -> T:
        """`fn` in a thread; an OS error in a VM folder (a folder where a file should be, a full disk) fails
        the call with a DiskError naming it, so it fails that VM only, not the session."""

        def guarded() -> T:
            try:
                return fn()
            except OSError as e:
                raise DiskError(f"file host {self.root}: {e}") from e

        return await asyncio.to_thread(guarded)

    async def list_vms(self) -> list[VmInfo]:
        return await self._run(self._list)

    async def get_vm(self, ref: str) -> VmInfo:
        return await self._run(lambda: self.vm(ref).info())

    async def vm_configuration(self, vm_id: str) -> bytes:
        return await self._run(lambda: self.vm(vm_id).configuration())

    async def create_checkpoint(self, vm_id: str, request: CheckpointRequest = CRASH_CONSISTENT) -> Checkpoint:
        # Always crash-consistent: a folder has no guest to quiesce (the guest-processing hook may, for
        # the session, before the checkpoint; see controller/engine/runtime.py).
        return await self._run(lambda: self.vm(vm_id).create_checkpoint())

    async def list_checkpoints(self, vm_id: str) -> list[Checkpoint]:
        return await self._run(lambda: self.vm(vm_id).list_checkpoints())

    async def changed_ranges(self, checkpoint: Checkpoint, disk_id: str, since: str) -> list[Extent] | Untracked:
        return await self._run(lambda: self.vm(checkpoint.vm_id).changed_ranges(checkpoint, disk_id, since))

    async def remove_checkpoint(self, vm_id: str, checkpoint_id: str) -> None:
        await self._run(lambda: self.vm(vm_id).remove_checkpoint(checkpoint_id))

    # -- failover: VMs registered in folders the target agent made, started and stopped --------------

    def _register(self, spec: VmSpec) -> VmInfo:
        folder = check_name("folder", spec.folder)  # a plain name, not hidden (.vmrepl-host is the host's)
        if not os.path.lexists(self.root / folder):  # the usual mistake: a failover host that is not vm_root
            raise FailedPrecondition(
                f"{self.root / folder} does not exist: the target agent makes a failed-over VM's folder in its "
                "vm_root, so the failover host's folder must be that vm_root"
            )
        # One at a time in this process (the controller registers): two calls for one folder give one VM.
        with _REGISTERING, Folder.open(self.root) as top, top.child(folder) as d:
            existing = d.read(MANIFEST, limit=MANIFEST_LIMIT)
            if existing is not None:  # registered already: idempotent by folder
                return self._registered(spec, parse_manifest(existing, self.root / folder / MANIFEST))
            try:
                disks = [DiskManifest(id=x.disk_id, path=x.path, format=x.format) for x in spec.disks]
                manifest = VmManifest(name=spec.name, id=str(uuid.uuid4()), disks=disks)
            except ValidationError as e:
                raise InvalidArgument("spec", str(e)) from e
            d.remove_tree(STATE_DIR)  # left by a VM unregistered halfway in this folder: never this one's
            vm = FileVm(root=self.root, folder=folder, manifest=manifest, host=self.host, key=self._key)
            for x in spec.disks:
                if (size := vm.size(x.disk_id)) != x.size:
                    raise FailedPrecondition(
                        f"disk {x.disk_id} of {self.root / folder} is {size} bytes, not the {x.size} of its spec"
                    )
            vm.set_power(PowerState.OFF)  # before vm.toml: the VM is never seen running before it is started
            d.replace(MANIFEST, manifest_text(manifest))
        return self.vm(manifest.id).info()

    def _registered(self, spec: VmSpec, manifest: VmManifest) -> VmInfo:
        """An earlier register's VM: its disks must be the spec's (a manifest someone else wrote there, naming
        an image of their own, would be booted as the failed-over VM)."""
        have = [(x.id, x.path, x.format) for x in manifest.disks]
        if have != [(x.disk_id, x.path, x.format) for x in spec.disks]:
            raise FailedPrecondition(
                f"{self.root / spec.folder / MANIFEST} names other disks than the VM to register: not written by "
                "vmrepl for it; refused"
            )
        return self.vm(manifest.id).info()

    def _unregister(self, vm_id: str) -> None:
        try:
            vm = self.vm(vm_id)
        except NotFound:
            return  # gone already: idempotent
        vm.unregister()

    async def register_vm(self, spec: VmSpec) -> VmInfo:
        """A `vm.toml` in the folder `spec.folder` (made by the target agent with the disks): the VM, off."""
        return await self._run(lambda: self._register(spec))

    async def unregister_vm(self, vm_id: str) -> None:
        await self._run(lambda: self._unregister(vm_id))

    async def start_vm(self, vm_id: str) -> None:
        await self._run(lambda: self.vm(vm_id).set_power(PowerState.RUNNING))

    async def stop_vm(self, vm_id: str) -> None:
        await self._run(lambda: self.vm(vm_id).set_power(PowerState.OFF))

    async def merge_vm_disks(self, vm_id: str) -> None:
        """Permanent failover, after the target agent's FlattenMount: the VM stands on its plain images
        (FileVm.stand_alone). The merge itself is the target's: it holds the replica the base came from."""
        await self._run(lambda: self.vm(vm_id).stand_alone())

    async def shutdown_vm(self, vm_id: str, *, wait_seconds: float) -> None:
        # A folder has no guest to ask: it is off at once (nothing it wrote is unflushed: writes are durable).
        del wait_seconds
        await self._run(lambda: self.vm(vm_id).set_power(PowerState.OFF))
