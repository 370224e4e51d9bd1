"""Positional file I/O that works on Linux and on Windows, and the one seam for the target's
file-system changes.

Everything that touches image bytes goes through `PositionalFile`, so the
agents run unchanged as Windows services:

* reads and writes: `os.preadv` / `os.pwrite` where the OS has them (they
  release the GIL and need no shared file position); elsewhere seek-and-read
  under a lock;
* holes: `fallocate(PUNCH_HOLE)` on Linux, `FSCTL_SET_SPARSE` +
  `FSCTL_SET_ZERO_DATA` on Windows, writing zeros where neither works;
* allocated ranges: `SEEK_DATA`/`SEEK_HOLE` on Linux,
  `FSCTL_QUERY_ALLOCATED_RANGES` on Windows, else the whole file;
* durability: `fdatasync`/`fsync` of the file and, on POSIX, of its directory.

Every other change the target makes to its datastore goes through the small
functions here too (`atomic_write`, `sync_dir`, `make_dirs`, `rename`, `link`,
`remove`, `remove_tree`; reads through `read_bytes`), so the test-only
recorder of `vmrepl.disk.powercut` sees each one and a simulated power cut
can be rebuilt from its log. Without the recorder each costs one check.

The Windows branches are written against the documented Win32 ioctls but
cannot be run on the Linux CI machines; see docs/architecture.md.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import stat
import sys
import threading
from pathlib import Path

from vmrepl.block import ZERO_CHUNK
from vmrepl.disk import powercut
from vmrepl.errors import DiskError, UnsupportedDisk
from vmrepl.extent import Extent, merge

IS_WINDOWS = sys.platform == "win32"
_O_BINARY = getattr(os, "O_BINARY", 0)
# A file opened for writing, or read with follow_links=False, is never opened through a symbolic link
# planted in its place (POSIX; Windows has no such flag and its links need a privilege to make).
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
# With it, such an open of a FIFO planted in the file's place returns at once (instead of waiting for a
# writer, a worker thread hung for good) and is then refused as not a regular file; regular files ignore it.
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_HAS_PREADV = hasattr(os, "preadv")

# Linux fallocate(2) modes.
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02

# Windows ioctls (winioctl.h).
_FSCTL_SET_SPARSE = 0x000900C4
_FSCTL_SET_ZERO_DATA = 0x000980C8
_FSCTL_QUERY_ALLOCATED_RANGES = 0x000940CF


def _libc_fallocate() -> object | None:
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    if not name:
        return None
    fn = ctypes.CDLL(name, use_errno=True).fallocate
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


_fallocate = _libc_fallocate()


class PositionalFile:
    """A file opened for positional I/O. Thread-safe for reads and writes at distinct offsets.

    Opened for writing, or with `follow_links=False`, a symbolic link in the file's place is refused
    (UnsupportedDisk): a link planted in the target's datastore must not let it write or read outside.
    Reads of source disks follow links (a VM's disk may be one; the file provider reads /dev/fd/N)."""

    def __init__(self, path: Path, *, writable: bool = False, create: bool = False, follow_links: bool = True) -> None:
        flags = (os.O_RDWR if writable else os.O_RDONLY) | _O_BINARY
        if create:
            flags |= os.O_CREAT
        strict = writable or not follow_links
        if strict:
            flags |= _O_NOFOLLOW | _O_NONBLOCK
        try:
            self.fd = _open(path, flags)
        except OSError as e:
            if strict and e.errno == errno.ELOOP:
                raise UnsupportedDisk(f"{path} is a symbolic link: vmrepl does not open this file through one") from e
            raise DiskError(f"cannot open {path}: {e.strerror}") from e
        if strict:
            _only_regular(self.fd, path)
        self.path = path
        self._lock = threading.Lock()  # only for the seek-based fallback
        if writable and IS_WINDOWS:
            _win_ioctl(self.fd, _FSCTL_SET_SPARSE, b"")

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def read_into(self, buf: memoryview, offset: int) -> int:
        """Fill `buf` from `offset`; returns bytes read (short only at end of file)."""
        done = 0
        want = len(buf)
        while done < want:
            if _HAS_PREADV:
                n = os.preadv(self.fd, [buf[done:]], offset + done)
            else:
                with self._lock:
                    os.lseek(self.fd, offset + done, os.SEEK_SET)
                    chunk = os.read(self.fd, want - done)
                    n = len(chunk)
                    buf[done : done + n] = chunk
            if n == 0:
                break
            done += n
        return done

    def write(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        view = memoryview(data)
        done = 0
        while done < len(view):
            if hasattr(os, "pwrite"):
                n = os.pwrite(self.fd, view[done:], offset + done)
            else:
                with self._lock:
                    os.lseek(self.fd, offset + done, os.SEEK_SET)
                    n = os.write(self.fd, view[done:])
            done += n
        if (rec := powercut.active()) is not None:
            rec.write(self.fd, offset, view)

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)
        if (rec := powercut.active()) is not None:
            rec.truncate(self.fd, size)

    def punch_hole(self, offset: int, length: int) -> None:
        """Make [offset, offset+length) read as zeros, freeing the space where the file system can."""
        end = min(offset + length, self.size())
        if end <= offset:
            return
        if _fallocate is not None:
            rc = _fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, end - offset)  # type: ignore[operator]
            if rc == 0:
                self._punched(offset, end)
                return
            err = ctypes.get_errno()
            if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise DiskError(f"punching a hole in {self.path} failed: {os.strerror(err)}")
        elif IS_WINDOWS:
            _win_ioctl(self.fd, _FSCTL_SET_ZERO_DATA, _pack_i64(offset, end))
            self._punched(offset, end)
            return
        self._write_zeros(offset, end)  # recorded as the writes it is

    def _punched(self, offset: int, end: int) -> None:
        if (rec := powercut.active()) is not None:
            rec.punch(self.fd, offset, end - offset)

    def _write_zeros(self, offset: int, end: int) -> None:
        while offset < end:
            n = min(len(ZERO_CHUNK), end - offset)
            self.write(memoryview(ZERO_CHUNK)[:n], offset)
            offset += n

    def allocated_extents(self) -> list[Extent]:
        """Ranges that may hold data; holes are left out. The whole file when the OS cannot say."""
        size = self.size()
        if size == 0:
            return []
        if IS_WINDOWS:
            return _win_allocated(self.fd, size)
        if not hasattr(os, "SEEK_DATA"):
            return [Extent(0, size)]
        out: list[Extent] = []
        pos = 0
        while pos < size:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # no data after pos
                    break
                return [Extent(0, size)]
            hole = os.lseek(self.fd, data, os.SEEK_HOLE)
            out.append(Extent(data, min(hole, size) - data))
            pos = hole
        return merge(out)

    def sync(self) -> None:
        rec = powercut.active()
        covers = rec.mark() if rec is not None else 0  # what the sync covers: all written before it began
        (os.fdatasync if hasattr(os, "fdatasync") else os.fsync)(self.fd)
        if rec is not None:
            rec.synced(self.fd, covers)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _only_regular(fd: int, path: Path) -> None:
    """Close `fd` and refuse it unless it is a regular file (a FIFO, a device or a socket planted in a
    datastore file's place)."""
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsupportedDisk(f"{path} is not a regular file: vmrepl does not read or write it")


def _open(path: Path, flags: int) -> int:
    rec = powercut.active()
    return os.open(path, flags, 0o640) if rec is None else rec.open(path, flags, 0o640)


def sync_dir(path: Path) -> None:
    """Make a rename or create inside `path` durable (POSIX; NTFS journals it)."""
    if IS_WINDOWS:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        rec = powercut.active()
        covers = rec.mark() if rec is not None else 0
        os.fsync(fd)
        if rec is not None:
            rec.synced_dir(fd, covers)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so a crash leaves the old or the new content, never a mix."""
    tmp = path.with_name(path.name + ".tmp")
    # A temporary left by a crash is dropped, not reopened: one planted as a symbolic or hard link would
    # have this write (and truncate) whatever it points at. A link planted again meanwhile fails the open.
    _remove(tmp)
    fd = _open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _O_BINARY | _O_NOFOLLOW)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        rec = powercut.active()
        if rec is not None:
            rec.write(fd, 0, data)
        covers = rec.mark() if rec is not None else 0
        os.fsync(fd)
        if rec is not None:
            rec.synced(fd, covers)
    finally:
        os.close(fd)
    _rename(tmp, path)
    sync_dir(path.parent)


def make_dirs(path: Path) -> None:
    """`mkdir -p`, durably: create `path` and its missing parents, and sync the directory each was made in
    (a power cut may otherwise lose a new directory's entry, and everything later written under it)."""
    missing: list[Path] = []
    p = path
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d)
        except FileExistsError:
            continue  # made by someone else meanwhile
        if (rec := powercut.active()) is not None:
            rec.made_dir(d)
        sync_dir(d.parent)
    if not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")


def rename(src: Path, dst: Path) -> None:
    """os.replace: `dst` now names what `src` named, durable when this returns (the directories synced)."""
    _rename(src, dst)
    sync_dir(dst.parent)
    if os.path.realpath(src.parent) != os.path.realpath(dst.parent):
        sync_dir(src.parent)


def _rename(src: Path, dst: Path) -> None:
    rec = powercut.active()
    ino = os.lstat(src).st_ino if rec is not None else 0
    os.replace(src, dst)
    if rec is not None:
        rec.renamed(ino, src, dst)


def link(src: Path, dst: Path) -> None:
    """A hard link `dst` to the file `src` (FileExistsError if `dst` exists), durable when this returns."""
    os.link(src, dst)
    if (rec := powercut.active()) is not None:
        rec.linked(os.lstat(dst).st_ino, dst)
    sync_dir(dst.parent)


def remove(path: Path) -> None:
    """Remove the file `path` (gone already is fine), durable when this returns."""
    if _remove(path):
        sync_dir(path.parent)


def _remove(path: Path) -> bool:
    rec = powercut.active()
    try:
        ino = os.lstat(path).st_ino if rec is not None else 0
        os.unlink(path)
    except FileNotFoundError:
        return False
    if rec is not None:
        rec.removed(ino, path)
    return True


def remove_tree(path: Path) -> None:
    """Remove a directory and everything under it (each removal through the seam), durable when this
    returns: the directory's entry in its parent is synced (what was inside goes with it)."""
    _remove_tree(path)
    sync_dir(path.parent)


def _remove_tree(path: Path) -> None:
    for entry in os.scandir(path):
        child = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            _remove_tree(child)
        else:
            _remove(child)
    rec = powercut.active()
    ino = os.lstat(path).st_ino if rec is not None else 0
    os.rmdir(path)
    if rec is not None:
        rec.removed(ino, path)


def read_bytes(path: Path, *, follow_links: bool = True) -> bytes:
    """A whole file's bytes (reads are not recorded: through here for symmetry with the writes);
    with `follow_links=False` a symbolic link in its place is refused (UnsupportedDisk)."""
    if follow_links:
        return path.read_bytes()
    try:
        fd = os.open(path, os.O_RDONLY | _O_BINARY | _O_NOFOLLOW | _O_NONBLOCK)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsupportedDisk(f"{path} is a symbolic link: vmrepl does not open this file through one") from e
        raise
    _only_regular(fd, path)
    with os.fdopen(fd, "rb") as f:
        return f.read()


def _pack_i64(*values: int) -> bytes:
    return b"".join(v.to_bytes(8, "little", signed=True) for v in values)


def _win_ioctl(fd: int, code: int, inbuf: bytes, out_size: int = 0) -> bytes:
    import msvcrt  # Windows only

    kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
    handle = msvcrt.get_osfhandle(fd)  # type: ignore[attr-defined]
    out = ctypes.create_string_buffer(out_size) if out_size else None
    returned = ctypes.c_ulong(0)
    ok = kernel32.DeviceIoControl(
        ctypes.c_void_p(handle), code, inbuf or None, len(inbuf), out, out_size, ctypes.byref(returned), None
    )
    if not ok:
        raise DiskError(f"DeviceIoControl {code:#x} failed: winerror {ctypes.GetLastError()}")  # type: ignore[attr-defined]
    return out.raw[: returned.value] if out is not None else b""


def _win_allocated(fd: int, size: int) -> list[Extent]:
    # One call returns up to 1024 ranges; ask again from the last one's end until done.
    out: list[Extent] = []
    pos = 0
    while pos < size:
        raw = _win_ioctl(fd, _FSCTL_QUERY_ALLOCATED_RANGES, _pack_i64(pos, size - pos), 16 * 1024)
        if not raw:
            break
        for i in range(0, len(raw), 16):
            off = int.from_bytes(raw[i : i + 8], "little", signed=True)
            length = int.from_bytes(raw[i + 8 : i + 16], "little", signed=True)
            if length > 0:
                out.append(Extent(off, length))
        last = out[-1].end if out else size
        if len(raw) < 16 * 1024 or last <= pos:
            break
        pos = last
    return merge(out)
