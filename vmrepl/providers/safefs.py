"""Files under a folder, opened relative to open folder descriptors without following symbolic links.

The file provider reads and writes VM folders that people other than the operator may write to. Each
name is opened relative to its parent folder's descriptor with O_NOFOLLOW (openat(2)), one component at
a time, so no component can be a symbolic link and nothing resolves outside the folder the walk started
from. Only real folders and regular files are accepted (a FIFO or a device is refused before it can block
or be read), and files the provider keeps for itself must have a single link: a hard link to another
file is refused. POSIX only (descriptor-relative calls); see docs/file-provider.md.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

from vmrepl.errors import DiskError, FailedPrecondition, PathError

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIR = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _NOFOLLOW | _CLOEXEC
_TAIL_CHUNK = 64 << 10


def _plain(name: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\x00" in name:
        raise PathError("name", f"{name!r} is not a single path component")
    return name


class Folder:
    """A folder held open by descriptor; close it (or use `with`)."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd = fd
        self.path = path

    @classmethod
    def open(cls, path: Path) -> Folder:
        """The top folder itself (the host folder the operator configured), opened as given."""
        try:
            return cls(os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _CLOEXEC), path)
        except FileNotFoundError as e:
            raise FailedPrecondition(f"{path} does not exist") from e
        except OSError as e:
            raise FailedPrecondition(f"cannot open folder {path}: {e.strerror}") from e

    def __enter__(self) -> Folder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _refused(self, name: str, e: OSError) -> Exception:
        where = self.path / name
        try:
            st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except OSError:
            st = None
        if st is not None and stat.S_ISLNK(st.st_mode):
            return FailedPrecondition(f"{where} is a symbolic link: refused (vmrepl never follows one in a VM folder)")
        if e.errno == errno.ENOTDIR:
            return FailedPrecondition(f"{where} is not a folder")
        if isinstance(e, FileNotFoundError):
            return FailedPrecondition(f"{where} does not exist")
        return DiskError(f"cannot open {where}: {e.strerror}")

    def child(self, name: str, *, create: bool = False) -> Folder:
        """A subfolder, never through a symbolic link; made (and its creation made durable) if `create`."""
        _plain(name)
        if create:
            try:
                os.mkdir(name, 0o700, dir_fd=self.fd)
                self.sync()
            except FileExistsError:
                pass
            except OSError as e:
                raise self._refused(name, e) from e
        try:
            return Folder(os.open(name, _DIR, dir_fd=self.fd), self.path / name)
        except OSError as e:
            raise self._refused(name, e) from e

    def maybe_child(self, name: str) -> Folder | None:
        """A subfolder if there is one (never through a symbolic link); None if nothing has that name."""
        try:
            return Folder(os.open(_plain(name), _DIR, dir_fd=self.fd), self.path / name)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise self._refused(name, e) from e

    def descend(self, parts: Sequence[str]) -> Folder:
        """The folder at `parts` below this one (a new descriptor, even for no parts)."""
        here = Folder(os.dup(self.fd), self.path)
        for part in parts:
            with here:
                nxt = here.child(part)
            here = nxt
        return here

    def exists(self, name: str) -> bool:
        try:
            os.stat(_plain(name), dir_fd=self.fd, follow_symlinks=False)
            return True
        except FileNotFoundError:
            return False

    def open_file(self, name: str, *, writable: bool = False, create: bool = False, own: bool = False) -> int:
        """A descriptor of the regular file `name`. `own`: a file the provider keeps (one link only)."""
        flags = (os.O_RDWR if writable else os.O_RDONLY) | _NOFOLLOW | _CLOEXEC | os.O_NONBLOCK
        if create:
            flags |= os.O_CREAT
        try:
            fd = os.open(_plain(name), flags, 0o600, dir_fd=self.fd)
        except OSError as e:
            if isinstance(e, FileNotFoundError) and not create:
                raise
            raise self._refused(name, e) from e
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise FailedPrecondition(f"{self.path / name} is not a regular file: refused")
            if own and st.st_nlink != 1:
                raise FailedPrecondition(f"{self.path / name} has other hard links: refused")
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def read(self, name: str, *, limit: int, own: bool = False) -> bytes | None:
        """The file's bytes; None when it does not exist."""
        try:
            fd = self.open_file(name, own=own)
        except FileNotFoundError:
            return None
        try:
            if os.fstat(fd).st_size > limit:
                raise FailedPrecondition(f"{self.path / name} is larger than {limit} bytes: refused")
            return _read_all(fd, limit)
        finally:
            os.close(fd)

    def replace(self, name: str, data: bytes) -> None:
        """Replace `name` so a crash leaves the old or the new bytes, durably (file, then folder)."""
        tmp = f"{_plain(name)}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=self.fd)  # a leftover (or planted) temporary: unlink never follows
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC
        fd = os.open(tmp, flags, 0o600, dir_fd=self.fd)
        try:
            _write_all(fd, data, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        self.sync()

    def unlink(self, name: str) -> bool:
        """Remove `name` (a symbolic link itself, never its target); False if it was not there."""
        try:
            os.unlink(_plain(name), dir_fd=self.fd)
            return True
        except FileNotFoundError:
            return False

    def sync(self) -> None:
        os.fsync(self.fd)

    def remove_tree(self, name: str) -> bool:
        """Remove the subfolder `name` and everything under it, never following a symbolic link (a link
        inside is removed itself), durably (this folder synced); False if nothing had that name."""
        sub = self.maybe_child(name)
        if sub is None:
            return False
        with sub:
            for entry in sub.names():
                if entry.is_dir(follow_symlinks=False):
                    sub.remove_tree(entry.name)
                else:
                    sub.unlink(entry.name)
        os.rmdir(_plain(name), dir_fd=self.fd)
        self.sync()
        return True

    def names(self) -> list[os.DirEntry[str]]:
        with os.scandir(self.fd) as it:
            return list(it)

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """An exclusive advisory lock on `name` (created if missing), across processes."""
        import fcntl

        fd = self.open_file(name, writable=True, create=True)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    # -- append-only logs of JSON lines ----------------------------------------------------------

    def append_line(self, name: str, line: bytes) -> None:
        """Append one line durably. A torn last line (a crash in the middle of an append: no newline at the
        end) is cut off first; the file's creation is made durable in its folder before this returns."""
        if b"\n" in line:
            raise ValueError("a line must not contain a newline")
        try:
            fd, created = self.open_file(name, writable=True, own=True), False
        except FileNotFoundError:
            fd, created = self.open_file(name, writable=True, create=True, own=True), True
        try:
            end = _complete_end(fd)
            if end != os.fstat(fd).st_size:
                os.ftruncate(fd, end)
            _write_all(fd, line + b"\n", end)
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            self.sync()

    def last_line(self, name: str) -> bytes | None:
        """The file's last complete line; None when it does not exist or has none."""
        try:
            fd = self.open_file(name, own=True)
        except FileNotFoundError:
            return None
        try:
            end = _complete_end(fd)
            if end == 0:
                return None
            start = _complete_end_before(fd, end - 1)
            return os.pread(fd, end - 1 - start, start)
        finally:
            os.close(fd)

    def lines(self, name: str, *, limit: int, own: bool = True) -> list[bytes] | None:
        """The file's complete lines (a torn last line is left out); None when it does not exist."""
        data = self.read(name, limit=limit, own=own)
        if data is None:
            return None
        return data[: data.rfind(b"\n") + 1].splitlines()


def _complete_end(fd: int) -> int:
    """Offset just past the file's last newline (0 if it has none)."""
    return _complete_end_before(fd, os.fstat(fd).st_size)


def _complete_end_before(fd: int, pos: int) -> int:
    """Offset just past the last newline before `pos` (0 if there is none)."""
    while pos > 0:
        start = max(0, pos - _TAIL_CHUNK)
        chunk = os.pread(fd, pos - start, start)
        i = chunk.rfind(b"\n")
        if i >= 0:
            return start + i + 1
        pos = start
    return 0


def _read_all(fd: int, limit: int) -> bytes:
    chunks, size = [], 0
    while chunk := os.read(fd, min(1 << 20, limit + 1 - size)):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise FailedPrecondition(f"a file grew past {limit} bytes while read: refused")
    return b"".join(chunks)


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n
