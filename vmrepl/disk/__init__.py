"""Disk images: positional file I/O, the reader/writer interfaces and their formats."""

from vmrepl.disk.base import DiskReader, DiskWriter, open_reader, register_reader

__all__ = ["DiskReader", "DiskWriter", "open_reader", "register_reader"]

# Formats register themselves on import.
from vmrepl.disk import raw as _raw  # noqa: F401
from vmrepl.disk import vhd as _vhd  # noqa: F401
from vmrepl.disk import vhdx as _vhdx  # noqa: F401
