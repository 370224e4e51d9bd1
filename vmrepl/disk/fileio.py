"""Positional file I/O that works on Linux and on Windows.

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

The Windows branches are written against the documented Win32 ioctls but
cannot be run on the Linux CI machines; see docs/architecture.md.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import sys
import threading
from pathlib import Path

from vmrepl.block import ZERO_CHUNK
from vmrepl.disk import powercut
from vmrepl.errors import DiskError
from vmrepl.extent import Extent, merge

IS_WINDOWS = sys.platform == "win32"
_O_BINARY = getattr(os, "O_BINARY", 0)
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
    """A file opened for positional I/O. Thread-safe for reads and writes at distinct offsets."""

    def __init__(self, path: Path, *, writable: bool = False, create: bool = False) -> None:
        flags = (os.O_RDWR if writable else os.O_RDONLY) | _O_BINARY
        if create:
            flags |= os.O_CREAT
        try:
            self.fd = os.open(path, flags, 0o640)
        except OSError as e:
            raise DiskError(f"cannot open {path}: {e.strerror}") from e
        self.path = path
        self._lock = threading.Lock()  # only for the seek-based fallback
        # Test only (vmrepl.disk.powercut): None unless a simulated power cut is being prepared for.
        self._journal = powercut.journal() if writable else None
        self._name = os.path.realpath(path) if self._journal is not None else ""
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
        if self._journal is not None:
            self._journal.before_write(self.fd, self._name, offset, len(view))
        done = 0
        while done < len(view):
            if hasattr(os, "pwrite"):
                n = os.pwrite(self.fd, view[done:], offset + done)
            else:
                with self._lock:
                    os.lseek(self.fd, offset + done, os.SEEK_SET)
                    n = os.write(self.fd, view[done:])
            done += n

    def truncate(self, size: int) -> None:
        if self._journal is not None:
            self._journal.before_write(self.fd, self._name, size, max(0, self.size() - size))
        os.ftruncate(self.fd, size)

    def punch_hole(self, offset: int, length: int) -> None:
        """Make [offset, offset+length) read as zeros, freeing the space where the file system can."""
        end = min(offset + length, self.size())
        if end <= offset:
            return
        if self._journal is not None:
            self._journal.before_write(self.fd, self._name, offset, end - offset)
        if _fallocate is not None:
            rc = _fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, end - offset)  # type: ignore[operator]
            if rc == 0:
                return
            err = ctypes.get_errno()
            if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise DiskError(f"punching a hole in {self.path} failed: {os.strerror(err)}")
        elif IS_WINDOWS:
            _win_ioctl(self.fd, _FSCTL_SET_ZERO_DATA, _pack_i64(offset, end))
            return
        self._write_zeros(offset, end)

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
        (os.fdatasync if hasattr(os, "fdatasync") else os.fsync)(self.fd)
        if self._journal is not None:
            self._journal.synced(self._name)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def sync_dir(path: Path) -> None:
    """Make a rename or create inside `path` durable (POSIX; NTFS journals it)."""
    if IS_WINDOWS:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so a crash leaves the old or the new content, never a mix."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _O_BINARY, 0o640)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    sync_dir(path.parent)


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


def make_dirs(path: Path) -> None:
    """Create `path` and its missing parents, each durable in its parent directory."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        d.mkdir(exist_ok=True)
        sync_dir(d.parent)


def rename(src: Path, dst: Path) -> None:
    """Replace `dst` with `src`, durable when this returns."""
    os.replace(src, dst)
    sync_dir(dst.parent)


def remove(path: Path) -> None:
    """Remove the file `path` (gone already is fine), durable when this returns."""
    try:
        path.unlink()
    except FileNotFoundError:
        return
    sync_dir(path.parent)
