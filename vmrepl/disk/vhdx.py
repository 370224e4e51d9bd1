"""VHDX images (MS-VHDX): opened and validated by `vhdx_format.read_layout`; payload read positionally.

The format's constants, structures and validation live in `vmrepl.disk.vhdx_format` (shared with the
writer, `vmrepl.disk.vhdx_writer`); this module maps blocks to file offsets and reads them.
"""

from __future__ import annotations

from pathlib import Path

from vmrepl.block import fill_zero
from vmrepl.disk.base import DiskReader, register_reader
from vmrepl.disk.fileio import PositionalFile
from vmrepl.disk.vhdx_format import Geometry, payload_offsets, read_layout
from vmrepl.domain import DiskFormat
from vmrepl.errors import DiskError
from vmrepl.extent import Extent, merge


class VhdxReader(DiskReader):
    def __init__(self, path: Path, *, follow_links: bool = True) -> None:
        self._file = PositionalFile(path, follow_links=follow_links)
        try:
            layout = read_layout(self._file)
            self.geometry: Geometry = layout.geometry
            self._block_offsets = payload_offsets(layout, self._file.size(), self._file.path)
        except BaseException:
            self._file.close()
            raise

    @property
    def size(self) -> int:
        return int(self.geometry.virtual_size)

    def allocated_extents(self) -> list[Extent]:
        bs = self.geometry.block_size
        out = [Extent(i * bs, min(bs, self.size - i * bs)) for i, off in enumerate(self._block_offsets) if off >= 0]
        return merge(out)

    def read_into(self, buf: memoryview, offset: int) -> None:
        if offset < 0 or offset + len(buf) > self.size:
            raise DiskError(f"{self._file.path}: read of {len(buf)} at {offset} is past the disk end")
        bs = self.geometry.block_size
        done = 0
        while done < len(buf):
            pos = offset + done
            idx, within = divmod(pos, bs)
            n = min(bs - within, len(buf) - done)
            target = buf[done : done + n]
            file_off = self._block_offsets[idx]
            if file_off < 0:
                fill_zero(target)
            elif self._file.read_into(target, file_off + within) != n:
                raise DiskError(f"{self._file.path}: short read in block {idx}")
            done += n

    def close(self) -> None:
        self._file.close()


register_reader(DiskFormat.VHDX, VhdxReader)
