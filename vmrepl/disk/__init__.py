"""Disk images: positional file I/O, the reader/writer interfaces and their formats."""

from vmrepl.disk.base import (
    DiskReader,
    DiskWriter,
    create_writer,
    open_reader,
    open_writer,
    register_reader,
    register_writer,
)

__all__ = [
    "DiskReader",
    "DiskWriter",
    "create_writer",
    "open_reader",
    "open_writer",
    "register_reader",
    "register_writer",
]

# Formats register themselves on import.
from vmrepl.disk import layer as _layer  # noqa: F401
from vmrepl.disk import raw as _raw  # noqa: F401
from vmrepl.disk import vhd as _vhd  # noqa: F401
from vmrepl.disk import vhdx as _vhdx  # noqa: F401
from vmrepl.disk import vhdx_writer as _vhdx_writer  # noqa: F401
