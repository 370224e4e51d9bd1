"""The two interfaces every disk format implements, and the reader factory.

Readers are looked up by format name in a registry; a new format registers
itself and nothing else changes (as benji's io/base.py does).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from pathlib import Path

from vmrepl.domain import DiskFormat
from vmrepl.errors import UnsupportedDisk
from vmrepl.extent import Extent


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
    def read_into(self, buf: memoryview, offset: int) -> None:
        """Fill `buf` with the disk's bytes at `offset` (unwritten ranges and the space past the end read as
        zeros): the target saves a block's old bytes before it overwrites them."""

    @abc.abstractmethod
    def write_zeros(self, offset: int, length: int) -> None:
        """Make the range read as zeros, as a hole where the format and file system allow."""

    @abc.abstractmethod
    def resize(self, size: int) -> None: ...

    @abc.abstractmethod
    def flush(self) -> None:
        """Make everything written so far durable."""

    @abc.abstractmethod
    def close(self) -> None: ...


ReaderFactory = Callable[[Path], DiskReader]
_READERS: dict[DiskFormat, ReaderFactory] = {}


def register_reader(fmt: DiskFormat, factory: ReaderFactory) -> None:
    _READERS[fmt] = factory


def open_reader(fmt: DiskFormat, path: Path) -> DiskReader:
    factory = _READERS.get(fmt)
    if factory is None:
        known = ", ".join(sorted(_READERS)) or "none"
        raise UnsupportedDisk(f"no reader for disk format {fmt!r} (this build reads: {known})")
    return factory(path)
