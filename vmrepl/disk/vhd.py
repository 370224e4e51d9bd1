"""VHD images (Connectix/Microsoft "vpc"): fixed and dynamic; differencing images are refused.

Fixed: the data, then a 512-byte footer. Dynamic: a footer copy, a dynamic
header, the BAT (big-endian sector numbers, 0xFFFFFFFF for an unallocated
block), and blocks each made of a sector bitmap and the data. A sector whose
bitmap bit is clear reads as zeros. All integers are big-endian; footer and
dynamic header carry a ones'-complement byte-sum checksum.
"""

from __future__ import annotations

import struct
import threading
from pathlib import Path

from vmrepl.block import fill_zero
from vmrepl.disk.base import DiskReader, register_reader
from vmrepl.disk.fileio import PositionalFile
from vmrepl.domain import DiskFormat
from vmrepl.errors import DiskError, UnsupportedDisk
from vmrepl.extent import Extent, clip, merge

SECTOR = 512
_FIXED, _DYNAMIC, _DIFFERENCING = 2, 3, 4
_UNALLOCATED = 0xFFFFFFFF


def _checksum_ok(raw: bytes, at: int) -> bool:
    stored: int = struct.unpack_from(">I", raw, at)[0]
    total = sum(raw[:at]) + sum(raw[at + 4 :])
    return (~total & 0xFFFFFFFF) == stored


class VhdReader(DiskReader):
    def __init__(self, path: Path, *, follow_links: bool = True) -> None:
        self._file = PositionalFile(path, follow_links=follow_links)
        self._bitmaps: dict[int, bytes] = {}
        self._lock = threading.Lock()
        try:
            self._open()
        except BaseException:
            self._file.close()
            raise

    def _read(self, offset: int, length: int, what: str) -> bytes:
        buf = bytearray(length)
        if self._file.read_into(memoryview(buf), offset) != length:
            raise UnsupportedDisk(f"{self._file.path}: truncated VHD ({what})")
        return bytes(buf)

    def _open(self) -> None:
        fsize = self._file.size()
        if fsize < SECTOR:
            raise UnsupportedDisk(f"{self._file.path} is too small to be a VHD")
        footer = self._read(fsize - SECTOR, SECTOR, "footer")
        if footer[:8] != b"conectix":
            raise UnsupportedDisk(f"{self._file.path} is not a VHD (no footer cookie)")
        if not _checksum_ok(footer, 64):
            raise UnsupportedDisk(f"{self._file.path}: VHD footer checksum does not match")
        data_offset, _ts, _app, _ver, _os, _orig, size, _geom, disk_type = struct.unpack_from(
            ">QI4sI4sQQII", footer, 16
        )
        self._size = size
        self._type = disk_type
        if disk_type == _DIFFERENCING:
            raise UnsupportedDisk(f"{self._file.path}: differencing VHD (it has a parent); not supported")
        if disk_type == _FIXED:
            if size > fsize - SECTOR:
                raise UnsupportedDisk(f"{self._file.path}: fixed VHD is shorter than its size")
            return
        if disk_type != _DYNAMIC:
            raise UnsupportedDisk(f"{self._file.path}: unknown VHD disk type {disk_type}")
        dyn = self._read(data_offset, 1024, "dynamic header")
        if dyn[:8] != b"cxsparse" or not _checksum_ok(dyn, 36):
            raise UnsupportedDisk(f"{self._file.path}: VHD dynamic header is damaged")
        table_offset, _hv, max_entries, block_size = struct.unpack_from(">QIII", dyn, 16)
        if block_size < SECTOR or block_size & (block_size - 1):
            raise UnsupportedDisk(f"{self._file.path}: VHD block size {block_size} is invalid")
        blocks = -(-size // block_size)
        if max_entries < blocks:
            raise UnsupportedDisk(f"{self._file.path}: VHD BAT has fewer entries than the disk has blocks")
        bat = self._read(table_offset, blocks * 4, "BAT")
        self._block_size = block_size
        self._bitmap_size = -(-(block_size // SECTOR // 8) // SECTOR) * SECTOR
        self._bat = list(struct.unpack(f">{blocks}I", bat))
        for i, sector in enumerate(self._bat):
            if sector != _UNALLOCATED and sector * SECTOR + self._bitmap_size + block_size > fsize:
                raise DiskError(f"{self._file.path}: VHD block {i} points outside the file")

    @property
    def size(self) -> int:
        return int(self._size)

    def allocated_extents(self) -> list[Extent]:
        if self._type == _FIXED:
            return clip(self._file.allocated_extents(), 0, self._size)
        bs = self._block_size
        return merge(Extent(i * bs, min(bs, self._size - i * bs)) for i, s in enumerate(self._bat) if s != _UNALLOCATED)

    def _bitmap(self, idx: int) -> bytes:
        with self._lock:
            bm = self._bitmaps.get(idx)
        if bm is None:
            bm = self._read(self._bat[idx] * SECTOR, self._bitmap_size, "sector bitmap")
            with self._lock:
                if len(self._bitmaps) > 4096:
                    self._bitmaps.clear()
                self._bitmaps[idx] = bm
        return bm

    def read_into(self, buf: memoryview, offset: int) -> None:
        if offset < 0 or offset + len(buf) > self._size:
            raise DiskError(f"{self._file.path}: read of {len(buf)} at {offset} is past the disk end")
        if self._type == _FIXED:
            if self._file.read_into(buf, offset) != len(buf):
                raise DiskError(f"{self._file.path}: short read at {offset}")
            return
        bs = self._block_size
        done = 0
        while done < len(buf):
            idx, within = divmod(offset + done, bs)
            n = min(bs - within, len(buf) - done)
            target = buf[done : done + n]
            sector = self._bat[idx]
            if sector == _UNALLOCATED:
                fill_zero(target)
            else:
                data_off = sector * SECTOR + self._bitmap_size
                if self._file.read_into(target, data_off + within) != n:
                    raise DiskError(f"{self._file.path}: short read in block {idx}")
                self._zero_absent_sectors(target, idx, within)
            done += n

    def _zero_absent_sectors(self, target: memoryview, idx: int, within: int) -> None:
        bm = self._bitmap(idx)
        first, last = within // SECTOR, (within + len(target) - 1) // SECTOR
        span = bm[first // 8 : last // 8 + 1]
        if span == b"\xff" * len(span):
            return  # the usual case: every sector of the range is present
        for s in range(first, last + 1):
            if not bm[s // 8] & (0x80 >> (s % 8)):
                lo = max(s * SECTOR - within, 0)
                hi = min((s + 1) * SECTOR - within, len(target))
                fill_zero(target[lo:hi])

    def close(self) -> None:
        self._file.close()


register_reader(DiskFormat.VHD, VhdReader)
