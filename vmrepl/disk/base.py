"""The two interfaces every disk format implements, and the reader and writer factories.

Readers and writers are looked up by format name in registries; a new format
registers itself and nothing else changes (as benji's io/base.py does).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from vmrepl.domain import DiskFormat
from vmrepl.errors import UnsupportedDisk
from vmrepl.extent import Extent, MiB


class DiskReader(abc.ABC):
    """A virtual disk as the proxy reads it: a size, allocated extents, positional reads."""

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """Virtual size in bytes."""

    @abc.abstractmethod
    def allocated_extents(self) -> list[Extent]:
        """Normal extent list of the ranges that may hold data; the rest reads as zeros."""

    @abc.abstractmethod
    def read_into(self, buf: memoryview, offset: int) -> None:
        """Fill `buf` with the disk's bytes at `offset`. Safe to call from several threads."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> DiskReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DiskWriter(abc.ABC):
    """A replica disk as the target writes it."""

    @property
    @abc.abstractmethod
    def size(self) -> int: ...

    @abc.abstractmethod
    def write(self, data: bytes | bytearray | memoryview, offset: int) -> None: ...

    @abc.abstractmethod
    def write_zeros(self, offset: int, length: int) -> None:
        """Make the range read as zeros, as a hole where the format and file system allow."""

    @abc.abstractmethod
    def read_into(self, buf: memoryview, offset: int) -> None:
        """Fill `buf` with the disk's bytes at `offset` as written so far (flushed or not); holes read as zeros.

        What the target reads to keep a block's old bytes before it overwrites them."""

    @abc.abstractmethod
    def allocated_extents(self) -> list[Extent]:
        """Normal extent list of the ranges that may hold data as written so far; the rest reads as zeros."""

    @abc.abstractmethod
    def resize(self, size: int) -> None: ...

    @abc.abstractmethod
    def flush(self) -> None:
        """Make everything written so far durable."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def identity(self) -> tuple[int, int]:
        """(device, inode) of the file this writer has open: a caller that checked a file by name checks it is
        the one being written (a name swapped between the two would otherwise be written)."""
        raise UnsupportedDisk(f"{type(self).__name__} cannot say which file it writes")

    def __enter__(self) -> DiskWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ReaderFactory(Protocol):
    def __call__(self, path: Path, *, follow_links: bool = True) -> DiskReader: ...


_READERS: dict[DiskFormat, ReaderFactory] = {}


def register_reader(fmt: DiskFormat, factory: ReaderFactory) -> None:
    _READERS[fmt] = factory


def open_reader(fmt: DiskFormat, path: Path, *, follow_links: bool = True) -> DiskReader:
    """The disk at `path`; with `follow_links=False` a symbolic link in its place is refused (the target
    reads its replicas so: a link planted in the datastore must not have it read outside)."""
    factory = _READERS.get(fmt)
    if factory is None:
        known = ", ".join(sorted(_READERS)) or "none"
        raise UnsupportedDisk(f"no reader for disk format {fmt!r} (this build reads: {known})")
    return factory(path, follow_links=follow_links)


class CreateWriter(Protocol):
    def __call__(self, path: Path, *, size: int, block_size: int) -> DiskWriter: ...


OpenWriter = Callable[[Path], DiskWriter]
_WRITERS: dict[DiskFormat, tuple[CreateWriter, OpenWriter]] = {}


def register_writer(fmt: DiskFormat, *, create: CreateWriter, open_existing: OpenWriter) -> None:
    _WRITERS[fmt] = (create, open_existing)


def _writer_factories(fmt: DiskFormat) -> tuple[CreateWriter, OpenWriter]:
    factories = _WRITERS.get(fmt)
    if factories is None:
        known = ", ".join(sorted(_WRITERS)) or "none"
        raise UnsupportedDisk(f"no writer for disk format {fmt!r} (this build writes: {known})")
    return factories


def create_writer(fmt: DiskFormat, path: Path, *, size: int, block_size: int = MiB) -> DiskWriter:
    """A new, empty disk of `size` bytes at `path`, durable when this returns; refuses an existing file.

    `block_size` is the format's allocation unit where it has one (VHDX); raw ignores it."""
    return _writer_factories(fmt)[0](path, size=size, block_size=block_size)


def open_writer(fmt: DiskFormat, path: Path) -> DiskWriter:
    """An existing disk opened for writing, validated as its reader validates it."""
    return _writer_factories(fmt)[1](path)
