"""vmrepl's differencing layer disk: a base image with extent stores on top.

A failed-over (or test-failed-over) VM on a file host runs from a layer disk, so what it writes never
touches the restore point under it. The disk is a descriptor `<disk>.layer` (JSON) beside its files:

    {"vmrepl_layer": 1, "size": N, "base": "disk0.base", "base_format": "raw",
     "stores": ["disk0.point", "disk0.top"], "state": "layered"}

* the **base**: an image of any readable format (a hard link of the replica's data file on the target);
* the **stores**, bottom to top: each an `ExtentStore`, a sparse `<store>.raw` holding bytes at their disk
  offsets and a `<store>.map` listing the ranges it holds. A byte is read from the highest store holding
  it, else from the base (zeros past the base's end). Only the top store is written.
* `flatten_layer` merges the stores into the base and marks the descriptor `flattened`: the layer then
  reads and writes the base alone (the plain image), and the store files are removed.

Every name in a descriptor is a plain file name in the descriptor's folder, opened without following a
symbolic link; the descriptor, a store's map and the base are files vmrepl did not necessarily write, so
each is checked and refused with a message naming it (docs/file-provider.md).

**The store's durability order** (shared with the file provider's checkpoint overlays, which are stores):
a write's bytes (and the data file's name) are made durable first, then its map line is appended and
fsynced. Only ranges a map line lists are ever read or merged, so a crash never exposes bytes that were
not written, and a write that returned is listed. A map line is placed so it never crosses a 512-byte
boundary (a sector: no torn line inside one), after a blank filler line when needed; a last line without
its newline is a torn append that was never acknowledged and is left out (and cut before the next append).
Bytes of a lost filler (NULs, no newline) are stripped from the line they precede.

Every change goes through `vmrepl.disk.fileio`, so the power-cut recorder sees it.
"""

from __future__ import annotations

import json
import os
import stat
import threading
from collections.abc import Sequence
from pathlib import Path

from vmrepl.disk import fileio
from vmrepl.disk.base import DiskReader, DiskWriter, open_reader, open_writer, register_reader, register_writer
from vmrepl.disk.fileio import PositionalFile
from vmrepl.domain import MAX_DISK_SIZE, DiskFormat
from vmrepl.errors import AlreadyExists, DiskError, FailedPrecondition, InvalidArgument, UnsupportedDisk
from vmrepl.extent import Extent, clip, complement, merge, subtract

__all__ = [
    "DESCRIPTOR_SUFFIX",
    "ExtentStore",
    "LayerDescriptor",
    "LayerDisk",
    "create_layer",
    "flatten_layer",
    "open_layer",
    "read_descriptor",
]

DESCRIPTOR_SUFFIX = ".layer"
VERSION = 1
LAYERED, FLATTENED = "layered", "flattened"
_DESCRIPTOR_LIMIT = 64 << 10
_MAP_LIMIT = 1 << 30
_SECTOR = 512
_COPY_CHUNK = 4 << 20
_BASE_FORMATS = (DiskFormat.RAW, DiskFormat.VHDX, DiskFormat.VHD)


def _plain(field: str, name: object) -> str:
    """A plain file name of the descriptor's folder: no folder part, no `..`, no hidden tricks."""
    if not isinstance(name, str) or not name or name in (".", "..") or any(c in name for c in "/\\\x00"):
        raise InvalidArgument(field, f"{name!r} is not a plain file name in the layer's folder")
    return name


# ---- the extent store -------------------------------------------------------------------------------


class ExtentStore:
    """Bytes at disk offsets, and the list of ranges held: `<name>.raw` and `<name>.map` in `folder`.

    `size` (when given) is the disk's: a map line past it is refused, as is a write past it. `shown` is
    the folder as error messages name it (when `folder` is a /dev/fd path). Writes are serialised per
    instance; one process writes a store at a time (the file provider holds its VM lock, the target its
    disk's). Readers see every write made before the call began (the map is read again when it grew)."""

    def __init__(self, folder: Path, name: str, *, size: int | None = None, shown: Path | None = None) -> None:
        self.folder = folder
        self.name = _plain("store", name)
        self.size = size
        self._shown = shown or folder
        self._lock = threading.Lock()
        self._parsed_end = 0  # the map's bytes parsed so far (complete lines only)
        self._lines = 0
        self._extents: list[Extent] = []
        self._map_id = (0, 0)  # the map file parsed (device, inode)

    @property
    def data_path(self) -> Path:
        return self.folder / f"{self.name}.raw"

    @property
    def map_path(self) -> Path:
        return self.folder / f"{self.name}.map"

    def _shown_path(self, suffix: str) -> Path:
        return self._shown / f"{self.name}{suffix}"

    def _open(self, suffix: str, *, writable: bool = False, create: bool = False) -> PositionalFile:
        """One of the store's files, never through a symbolic link, a regular file with no other hard
        link (a link planted to another file must not be written or read)."""
        path = self.folder / f"{self.name}{suffix}"
        try:
            f = PositionalFile(path, writable=writable, create=create, follow_links=False)
        except UnsupportedDisk as e:
            raise FailedPrecondition(str(e).replace(str(path), str(self._shown_path(suffix)))) from e
        except DiskError as e:
            raise DiskError(str(e).replace(str(path), str(self._shown_path(suffix)))) from e
        if os.fstat(f.fd).st_nlink != 1:
            f.close()
            raise FailedPrecondition(f"{self._shown_path(suffix)} has other hard links: refused")
        return f

    def _open_existing(self, suffix: str) -> PositionalFile | None:
        """As `_open`, read-only; None when the file does not exist."""
        if not os.path.lexists(self.folder / f"{self.name}{suffix}"):
            return None
        return self._open(suffix)

    def exists(self) -> bool:
        return os.path.lexists(self.map_path)

    def create_empty(self) -> None:
        """Both files, empty (emptied if there), durable with their folder entries."""
        for suffix in (".raw", ".map"):
            f = self._open(suffix, writable=True, create=True)
            try:
                f.truncate(0)
                f.sync()
            finally:
                f.close()
        fileio.sync_dir(self.folder)
        with self._lock:
            self._parsed_end, self._lines, self._extents = 0, 0, []

    # -- the map ----------------------------------------------------------------------------------------

    def extents(self) -> list[Extent]:
        """The ranges the store holds (a normal list): its map's complete lines; damage is refused."""
        with self._lock:
            return list(self._refresh())

    def _refresh(self) -> list[Extent]:
        f = self._open_existing(".map")
        if f is None:
            self._parsed_end, self._lines, self._extents = 0, 0, []
            return self._extents
        try:
            st = os.fstat(f.fd)
            size = st.st_size
            if size > _MAP_LIMIT:
                raise FailedPrecondition(f"{self._shown_path('.map')} is larger than {_MAP_LIMIT} bytes: refused")
            if size < self._parsed_end or (st.st_dev, st.st_ino) != self._map_id:  # replaced: read it all again
                self._parsed_end, self._lines, self._extents = 0, 0, []
                self._map_id = (st.st_dev, st.st_ino)
            if size > self._parsed_end:
                tail = bytearray(size - self._parsed_end)
                got = f.read_into(memoryview(tail), self._parsed_end)
                self._parse(bytes(tail[:got]))
        finally:
            f.close()
        return self._extents

    def _parse(self, tail: bytes) -> None:
        complete = tail[: tail.rfind(b"\n") + 1]  # a last line without its newline was never acknowledged
        found = []
        for raw in complete.split(b"\n")[:-1]:
            self._lines += 1
            line = raw.strip(b"\x00 \t\r")  # a lost filler's NULs (see the module's docstring)
            if line:
                found.append(self._parse_line(line, self._lines))
        self._parsed_end += len(complete)
        self._extents = merge([*self._extents, *found])

    def _parse_line(self, line: bytes, n: int) -> Extent:
        where = self._shown_path(".map")
        try:
            value = json.loads(line)
        except ValueError as e:
            raise FailedPrecondition(f"{where} line {n} is damaged: refused") from e
        ok = isinstance(value, list) and len(value) == 2
        ok = ok and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        if not ok:
            raise FailedPrecondition(f"{where} line {n} is damaged: refused")
        offset, length = value
        if offset < 0 or length <= 0 or (self.size is not None and offset + length > self.size):
            raise FailedPrecondition(f"{where} line {n} lies outside disk {self.name} ({self.size} bytes): refused")
        return Extent(offset, length)

    def _append(self, extents: Sequence[Extent]) -> None:
        """Append one map line per extent, in one write and one fsync; the file's creation made durable."""
        created = not os.path.lexists(self.map_path)
        f = self._open(".map", writable=True, create=True)
        try:
            size = f.size()
            end = _complete_end(f, size)
            if end != size:
                f.truncate(end)  # a torn tail: cut, durably, before anything is written where it was
                f.sync()
            f.write(_lines(extents, end), end)
            f.sync()
        finally:
            f.close()
        if created:
            fileio.sync_dir(self.folder)

    # -- data -------------------------------------------------------------------------------------------

    def read_into(self, buf: memoryview, offset: int) -> None:
        """Fill the parts of `buf` (the disk's bytes at `offset`) the store holds; the rest is left as is."""
        with self._lock:
            held = clip(self._refresh(), offset, offset + len(buf))
        if not held:
            return
        f = self._open_existing(".raw")
        if f is None:
            raise FailedPrecondition(f"{self._shown_path('.raw')} does not exist but its map lists data: refused")
        try:
            for e in held:
                view = buf[e.offset - offset : e.end - offset]
                if f.read_into(view, e.offset) != len(view):
                    raise FailedPrecondition(f"{self._shown_path('.raw')} is shorter than its map says: refused")
        finally:
            f.close()

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or (self.size is not None and offset + length > self.size):
            raise InvalidArgument("offset", f"[{offset}, +{length}) is outside disk {self.name} ({self.size} bytes)")

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Hold `data` at `offset`, over what the store held there; durable when this returns."""
        self._check_range(offset, len(data))
        if not data:
            return
        with self._lock:
            self._refresh()
            self._write_ranges(memoryview(data), offset, [Extent(offset, len(data))])

    def write_missing(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Hold the parts of `data` the store does not hold yet (first writer wins: a byte held is never
        replaced); durable when this returns. Returns the bytes written."""
        self._check_range(offset, len(data))
        if not data:
            return 0
        with self._lock:
            missing = subtract([Extent(offset, len(data))], self._refresh())
            self._write_ranges(memoryview(data), offset, missing)
        return sum(e.length for e in missing)

    def _write_ranges(self, data: memoryview, offset: int, ranges: list[Extent]) -> None:
        if not ranges:
            return
        created = not os.path.lexists(self.data_path)
        f = self._open(".raw", writable=True, create=True)
        try:
            for e in ranges:
                f.write(data[e.offset - offset : e.end - offset], e.offset)
            f.sync()
        finally:
            f.close()
        if created:
            fileio.sync_dir(self.folder)
        self._append(ranges)

    def remove(self) -> None:
        """Remove both files (durably); gone already is fine."""
        fileio.remove(self.data_path)
        fileio.remove(self.map_path)
        with self._lock:
            self._parsed_end, self._lines, self._extents = 0, 0, []


def _complete_end(f: PositionalFile, size: int) -> int:
    """Offset just past the map's last newline (0 if it has none)."""
    pos = size
    while pos > 0:
        start = max(0, pos - (64 << 10))
        chunk = bytearray(pos - start)
        f.read_into(memoryview(chunk), start)
        i = chunk.rfind(b"\n")
        if i >= 0:
            return start + i + 1
        pos = start
    return 0


def _lines(extents: Sequence[Extent], at: int) -> bytes:
    """Map lines for `extents` written at file offset `at`, each inside one sector (a filler line first
    when it would cross a sector boundary)."""
    out = bytearray()
    for e in extents:
        line = json.dumps([e.offset, e.length]).encode() + b"\n"
        room = _SECTOR - (at + len(out)) % _SECTOR
        if len(line) > room:
            out += b" " * (room - 1) + b"\n"
        out += line
    return bytes(out)


# ---- the descriptor ---------------------------------------------------------------------------------


class LayerDescriptor:
    """A parsed, checked descriptor."""

    def __init__(self, *, size: int, base: str, base_format: DiskFormat, stores: Sequence[str], state: str) -> None:
        self.size = size
        self.base = base
        self.base_format = base_format
        self.stores = tuple(stores)
        self.state = state

    def to_json(self) -> bytes:
        doc = {
            "vmrepl_layer": VERSION,
            "size": self.size,
            "base": self.base,
            "base_format": self.base_format.value,
            "stores": list(self.stores),
            "state": self.state,
        }
        return json.dumps(doc, indent=1).encode() + b"\n"


def _check_names(descriptor: str, base: str, stores: Sequence[str]) -> None:
    _plain("base", base)
    if base == descriptor:
        raise InvalidArgument("base", f"{base!r} is the descriptor itself, another part of the layer")
    files = {descriptor, base}
    for s in stores:
        _plain("stores", s)
        for name in (f"{s}.raw", f"{s}.map"):
            if name in files:
                raise InvalidArgument("stores", f"store {s!r} would use {name}, which another part of the layer uses")
            files.add(name)


def parse_descriptor(data: bytes, *, where: Path) -> LayerDescriptor:
    """A descriptor's bytes, checked field by field; anything else refused naming the file."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise FailedPrecondition(f"{where} is not a layer descriptor (not JSON): refused") from e
    keys = {"vmrepl_layer", "size", "base", "base_format", "stores", "state"}
    if not isinstance(doc, dict) or set(doc) != keys:
        raise FailedPrecondition(f"{where} is not a layer descriptor (it needs exactly {sorted(keys)}): refused")
    if doc["vmrepl_layer"] != VERSION:
        raise FailedPrecondition(f"{where} is layer version {doc['vmrepl_layer']!r}; this build reads {VERSION}")
    size, stores, state = doc["size"], doc["stores"], doc["state"]
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_DISK_SIZE:
        raise FailedPrecondition(f"{where}: size {size!r} is not a disk size (0 to {MAX_DISK_SIZE}): refused")
    if doc["base_format"] not in [f.value for f in _BASE_FORMATS]:
        raise FailedPrecondition(f"{where}: base_format {doc['base_format']!r} is not one of raw, vhdx, vhd: refused")
    if not isinstance(stores, list) or not stores or len(set(map(str, stores))) != len(stores):
        raise FailedPrecondition(f"{where}: stores must be a non-empty list of distinct names: refused")
    if state not in (LAYERED, FLATTENED):
        raise FailedPrecondition(f"{where}: state {state!r} is neither {LAYERED} nor {FLATTENED}: refused")
    try:
        _check_names(where.name, doc["base"], stores)
    except InvalidArgument as e:
        raise FailedPrecondition(f"{where}: {e}: refused") from e
    return LayerDescriptor(
        size=size, base=doc["base"], base_format=DiskFormat(doc["base_format"]), stores=stores, state=state
    )


def read_descriptor(path: Path) -> LayerDescriptor:
    """The descriptor at `path` (never through a symbolic link; a regular file of at most 64 KiB)."""
    try:
        f = PositionalFile(path, follow_links=False)
    except UnsupportedDisk as e:
        raise FailedPrecondition(str(e)) from e
    except DiskError as e:
        raise FailedPrecondition(f"layer descriptor {path} cannot be read: {e}") from e
    try:
        size = f.size()
        if size > _DESCRIPTOR_LIMIT:
            raise FailedPrecondition(f"{path} is larger than {_DESCRIPTOR_LIMIT} bytes: not a layer descriptor")
        buf = bytearray(size)
        f.read_into(memoryview(buf), 0)
    finally:
        f.close()
    return parse_descriptor(bytes(buf), where=path)


def descriptor_path(folder: Path, name: str) -> Path:
    """`<folder>/<name>.layer` (a name already ending in .layer is taken as is)."""
    _plain("name", name)
    return folder / (name if name.endswith(DESCRIPTOR_SUFFIX) else name + DESCRIPTOR_SUFFIX)


# ---- the layer disk ---------------------------------------------------------------------------------


class LayerDisk(DiskReader):
    """A layer disk, read as one image (a DiskReader); opened writable, `write` goes to the top store (or,
    once flattened, to the base), durable when it returns."""

    def __init__(self, path: Path, *, writable: bool = False) -> None:
        self.path = path
        self.folder = path.parent
        self.writable = writable
        self.descriptor = read_descriptor(path)
        d = self.descriptor
        self.stores = [ExtentStore(self.folder, s, size=d.size) for s in d.stores]
        self._base_path = self.folder / d.base
        if not os.path.lexists(self._base_path):
            raise FailedPrecondition(f"layer {path}: its base {self._base_path} does not exist")
        try:
            self._base = open_reader(d.base_format, self._base_path, follow_links=False)
        except UnsupportedDisk as e:
            raise FailedPrecondition(f"layer {path}: base {e}") from e
        try:
            self._check()
        except BaseException:
            self._base.close()
            raise
        self._lock = threading.Lock()

    @property
    def flattened(self) -> bool:
        return self.descriptor.state == FLATTENED

    def _check(self) -> None:
        """Every store there; a base shorter than the layer only where the stores hold the rest (a replica
        shrunk after its point: the target saved the cut bytes in the point store)."""
        if self.flattened:
            if self._base.size != self.descriptor.size:
                raise FailedPrecondition(
                    f"layer {self.path} is flattened into {self._base_path}, which is {self._base.size} bytes, "
                    f"not the layer's {self.descriptor.size}: refused"
                )
            return
        for s in self.stores:
            if not s.exists():
                raise FailedPrecondition(f"layer {self.path}: its store {s.map_path} does not exist: refused")
        gap = complement(merge(e for s in self.stores for e in s.extents()), self._base.size, self.descriptor.size)
        if gap:
            raise FailedPrecondition(
                f"layer {self.path}: its base {self._base_path} is {self._base.size} bytes, shorter than the "
                f"layer's {self.descriptor.size}, and its stores do not hold the rest "
                f"(from {gap[0].offset}): refused"
            )

    @property
    def size(self) -> int:
        return self.descriptor.size

    def allocated_extents(self) -> list[Extent]:
        if self.size == 0:
            return []
        base = clip(self._base.allocated_extents(), 0, self.size)
        if self.flattened:
            return base
        return merge([*base, *(e for s in self.stores for e in s.extents())])

    def read_into(self, buf: memoryview, offset: int) -> None:
        if offset < 0 or offset + len(buf) > self.size:
            raise InvalidArgument("offset", f"[{offset}, +{len(buf)}) is outside layer {self.path} ({self.size} bytes)")
        # The base first, then the stores: under a test failover the target saves a base block into the
        # point store (durably) before it overwrites it, so a base read that saw the new bytes is followed
        # by a store read that sees the saved ones.
        from_base = max(0, min(len(buf), self._base.size - offset))
        if from_base:
            self._base.read_into(buf[:from_base], offset)
        buf[from_base:] = bytes(len(buf) - from_base)
        if not self.flattened:
            for s in self.stores:  # bottom to top: a higher store's bytes win
                s.read_into(buf, offset)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Durable when this returns (as a guest's flushed write)."""
        if not self.writable:
            raise FailedPrecondition(f"layer {self.path} is open read-only")
        if offset < 0 or offset + len(data) > self.size:
            raise InvalidArgument("offset", f"[{offset}, +{len(data)}) is outside layer {self.path} ({self.size} B)")
        if not self.flattened:
            self.stores[-1].write(offset, data)
            return
        with self._lock, open_writer(self.descriptor.base_format, self._base_path) as w:
            links = os.stat(self._base_path, follow_symlinks=False).st_nlink
            if links != 1:
                # Still the replica's data file too (its DeleteReplica not done): writing would change it.
                raise FailedPrecondition(
                    f"layer {self.path} is flattened into {self._base_path}, which has {links - 1} other hard "
                    "link(s) (the replica it came from?): refused until it stands alone"
                )
            w.write(data, offset)
            w.flush()

    def close(self) -> None:
        self._base.close()

    def __enter__(self) -> LayerDisk:
        return self


def open_layer(path: Path, *, writable: bool = False) -> LayerDisk:
    """The layer disk whose descriptor is `path`, checked (see LayerDisk._check)."""
    return LayerDisk(path, writable=writable)


def _reader(path: Path, *, follow_links: bool = True) -> DiskReader:
    # A descriptor is never read through a symbolic link, whatever the caller allows: its names are
    # relative to its own folder, which a link would change.
    del follow_links
    return LayerDisk(path)


# ---- making one -------------------------------------------------------------------------------------


def create_layer(
    folder: Path, name: str, *, size: int, base: str, base_format: DiskFormat, stores: Sequence[str]
) -> Path:
    """A new layer disk `<folder>/<name>.layer` over the existing `base`, with empty `stores` (bottom to
    top); the descriptor is written last, durably, so a crash leaves no layer or a whole one. Again with
    the same settings it returns the existing layer untouched (its stores may hold data by then); with
    other settings it is refused."""
    path = descriptor_path(folder, name)
    if isinstance(size, bool) or not 0 <= size <= MAX_DISK_SIZE:
        raise InvalidArgument("size", f"{size!r} is not a disk size (0 to {MAX_DISK_SIZE})")
    if base_format not in _BASE_FORMATS:
        raise InvalidArgument("base_format", f"{base_format!r} cannot be a layer's base (raw, vhdx or vhd)")
    if not stores:
        raise InvalidArgument("stores", "a layer needs at least one store (its top is where writes go)")
    if len(set(stores)) != len(stores):
        raise InvalidArgument("stores", f"{list(stores)} names a store twice")
    _check_names(path.name, base, stores)
    want = LayerDescriptor(size=size, base=base, base_format=base_format, stores=stores, state=LAYERED)
    if os.path.lexists(path):
        have = read_descriptor(path)
        if have.to_json() != want.to_json():
            raise AlreadyExists(f"{path} exists with other settings; remove it first")
        return path
    base_st = _lstat(folder / base)
    if base_st is None or not stat.S_ISREG(base_st.st_mode):
        raise FailedPrecondition(f"the base {folder / base} is not a regular file (nor followed if a link)")
    for s in stores:
        ExtentStore(folder, s, size=size).create_empty()  # no descriptor yet: leftovers of a crash, dropped
    fileio.atomic_write(path, want.to_json())
    return path


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


# ---- flattening -------------------------------------------------------------------------------------


def flatten_layer(path: Path, *, base_identity: tuple[int, int] | None = None) -> Path:
    """Merge the stores into the base (bottom to top), mark the descriptor flattened, remove the stores;
    returns the base, the plain image. A crash at any step leaves the layer reading as before (the base
    only gains bytes the stores above it hold, which still win), and flattening again finishes it.

    `base_identity` (device, inode): the file the merge may write. It is checked on the file the merge opens,
    not by name before, so a base swapped in the folder between a caller's check and the merge is refused."""
    desc = read_descriptor(path)
    folder = path.parent
    base = folder / desc.base
    stores = [ExtentStore(folder, s, size=desc.size) for s in desc.stores]
    if desc.state == LAYERED:
        with LayerDisk(path):  # checked as a reader would, before anything is written
            pass
        _merge_into_base(desc, base, stores, base_identity)
        flat = LayerDescriptor(
            size=desc.size, base=desc.base, base_format=desc.base_format, stores=desc.stores, state=FLATTENED
        )
        fileio.atomic_write(path, flat.to_json())
    for s in stores:
        s.remove()
    return base


def _merge_into_base(
    desc: LayerDescriptor, base: Path, stores: list[ExtentStore], identity: tuple[int, int] | None
) -> None:
    try:
        writer = open_writer(desc.base_format, base)
    except UnsupportedDisk as e:
        raise FailedPrecondition(f"cannot flatten into {base}: {e}") from e
    if identity is not None and writer.identity() != identity:  # the file opened, not the name checked before
        writer.close()
        raise FailedPrecondition(f"{base} is not the base image this layer may be merged into: refused")
    with writer:
        if writer.size != desc.size:
            writer.resize(desc.size)  # grown: the stores hold what is past the old end (checked)
        buf = bytearray(_COPY_CHUNK)
        for s in stores:
            for held in s.extents():
                for pos in range(held.offset, held.end, _COPY_CHUNK):
                    view = memoryview(buf)[: min(_COPY_CHUNK, held.end - pos)]
                    s.read_into(view, pos)
                    writer.write(view, pos)
        writer.flush()


# ---- the disk factory -------------------------------------------------------------------------------


class _LayerWriter(DiskWriter):
    """A layer disk through the writer interface: writes to the top store, each durable at once."""

    def __init__(self, path: Path) -> None:
        self._disk = LayerDisk(path, writable=True)

    @property
    def size(self) -> int:
        return self._disk.size

    def write(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        self._disk.write(offset, data)

    def write_zeros(self, offset: int, length: int) -> None:
        zeros = bytes(min(length, _COPY_CHUNK))
        for pos in range(offset, offset + length, _COPY_CHUNK):
            self._disk.write(pos, zeros[: min(_COPY_CHUNK, offset + length - pos)])

    def read_into(self, buf: memoryview, offset: int) -> None:
        self._disk.read_into(buf, offset)

    def allocated_extents(self) -> list[Extent]:
        return self._disk.allocated_extents()

    def resize(self, size: int) -> None:
        raise UnsupportedDisk(f"layer {self._disk.path} has the size of its restore point; it is not resized")

    def flush(self) -> None:
        """Every write is durable when it returns: nothing to do."""

    def close(self) -> None:
        self._disk.close()


def _create_writer(path: Path, *, size: int, block_size: int) -> DiskWriter:
    del size, block_size
    raise UnsupportedDisk(f"{path}: a layer disk is made with vmrepl.disk.layer.create_layer, over a base")


register_reader(DiskFormat.LAYER, _reader)
register_writer(DiskFormat.LAYER, create=_create_writer, open_existing=_LayerWriter)
