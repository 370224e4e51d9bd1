"""Raw (flat) disk images: the file's bytes are the disk's bytes."""

from __future__ import annotations

import os
from pathlib import Path

from vmrepl.disk.base import DiskReader, DiskWriter, register_reader, register_writer
from vmrepl.disk.fileio import PositionalFile, sync_dir
from vmrepl.domain import DiskFormat
from vmrepl.errors import AlreadyExists, DiskError, InvalidArgument
from vmrepl.extent import Extent


class RawReader(DiskReader):
    def __init__(self, path: Path, *, follow_links: bool = True) -> None:
        self._file = PositionalFile(path, follow_links=follow_links)
        self._size = self._file.size()

    @property
    def size(self) -> int:
        return self._size

    def allocated_extents(self) -> list[Extent]:
        return self._file.allocated_extents()

    def read_into(self, buf: memoryview, offset: int) -> None:
        n = self._file.read_into(buf, offset)
        if n != len(buf):
            raise DiskError(f"{self._file.path}: short read at {offset} ({n} of {len(buf)} bytes)")

    def close(self) -> None:
        self._file.close()


class RawWriter(DiskWriter):
    """A sparse raw file: zero extents become holes."""

    def __init__(self, path: Path, *, create: bool = False) -> None:
        self._file = PositionalFile(path, writable=True, create=create)

    @property
    def size(self) -> int:
        return self._file.size()

    def write(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        self._file.write(data, offset)

    def write_zeros(self, offset: int, length: int) -> None:
        self._file.punch_hole(offset, length)

    def read_into(self, buf: memoryview, offset: int) -> None:
        n = self._file.read_into(buf, offset)
        if n != len(buf):
            raise DiskError(f"{self._file.path}: short read at {offset} ({n} of {len(buf)} bytes)")

    def allocated_extents(self) -> list[Extent]:
        return self._file.allocated_extents()

    def resize(self, size: int) -> None:
        self._file.truncate(size)

    def flush(self) -> None:
        self._file.sync()

    def identity(self) -> tuple[int, int]:
        st = os.fstat(self._file.fd)
        return st.st_dev, st.st_ino

    def close(self) -> None:
        self._file.close()


def create_raw(path: Path, *, size: int, block_size: int = 0) -> RawWriter:
    """A new sparse raw file of `size` bytes, durable with its folder entry; refuses an existing file.

    `block_size` is accepted for the factory's sake: a raw file has no allocation unit of its own."""
    del block_size
    if size < 0:
        raise InvalidArgument("size", f"a disk size cannot be negative ({size})")
    if path.exists():
        raise AlreadyExists(f"{path} exists; a new replica disk is never written over an old one")
    writer = RawWriter(path, create=True)
    try:
        writer.resize(size)
        writer.flush()
        sync_dir(path.parent)
    except BaseException:
        writer.close()
        raise
    return writer


register_reader(DiskFormat.RAW, RawReader)
register_writer(DiskFormat.RAW, create=create_raw, open_existing=RawWriter)
