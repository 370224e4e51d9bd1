"""VHDX images (MS-VHDX): headers, region table, metadata and BAT parsed here; payload read positionally.

Only what a replica needs is parsed: the current header (CRC-32C checked,
highest sequence number of the two, version 1 as MS-VHDX requires), the region table (CRC-32C checked),
the metadata items for block size, virtual size, logical sector size and
the parent flag, and the BAT. A header whose log GUID is set means the log
holds entries to replay: the image is refused (the hypervisor replays logs;
we never guess). Differencing images (a parent) are refused until AVHDX
chains are supported.

BAT entries of payload blocks interleave with sector-bitmap entries: after
every `chunk_ratio` payload entries comes one bitmap entry, where
chunk_ratio = 2^23 * logical_sector_size / block_size.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

import crc32c

from vmrepl.block import fill_zero
from vmrepl.disk.base import DiskReader, register_reader
from vmrepl.disk.fileio import PositionalFile
from vmrepl.domain import DiskFormat
from vmrepl.errors import DiskError, UnsupportedDisk
from vmrepl.extent import Extent, MiB, merge

KiB = 1024
_HEADER_OFFSETS = (64 * KiB, 128 * KiB)
_REGION_OFFSETS = (192 * KiB, 256 * KiB)
_BAT_GUID = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08")
_METADATA_GUID = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E")
_FILE_PARAMETERS = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
_VIRTUAL_DISK_SIZE = uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
_LOGICAL_SECTOR_SIZE = uuid.UUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
_PARENT_LOCATOR = uuid.UUID("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")

VHDX_VERSION = 1  # MS-VHDX 2.2.2.1: a header's Version MUST be 1

# Payload block states (MS-VHDX 2.5.1.1). Only these two hold data in a non-differencing image.
PAYLOAD_FULLY_PRESENT = 6
PAYLOAD_PARTIALLY_PRESENT = 7


def _guid(raw: bytes) -> uuid.UUID:
    return uuid.UUID(bytes_le=raw)


def _check_crc(block: bytes) -> bool:
    """CRC-32C over the structure with its checksum field (bytes 4..8) zeroed."""
    stored = struct.unpack_from("<I", block, 4)[0]
    return bool(crc32c.crc32c(block[:4] + b"\0\0\0\0" + block[8:]) == stored)


@dataclass(frozen=True, slots=True)
class Header:
    sequence: int
    log_guid: uuid.UUID
    version: int


@dataclass(frozen=True, slots=True)
class Geometry:
    block_size: int
    virtual_size: int
    logical_sector_size: int
    has_parent: bool


def _read(f: PositionalFile, offset: int, length: int, what: str) -> bytes:
    buf = bytearray(length)
    if f.read_into(memoryview(buf), offset) != length:
        raise UnsupportedDisk(f"{f.path}: truncated VHDX ({what} at {offset})")
    return bytes(buf)


def _current_header(f: PositionalFile) -> Header:
    found = []
    for off in _HEADER_OFFSETS:
        raw = _read(f, off, 4 * KiB, "header")
        if raw[:4] != b"head" or not _check_crc(raw):
            continue
        seq = struct.unpack_from("<Q", raw, 8)[0]
        log_guid = _guid(raw[48:64])
        version = struct.unpack_from("<H", raw, 66)[0]
        found.append(Header(seq, log_guid, version))
    if not found:
        raise UnsupportedDisk(f"{f.path}: no VHDX header has a valid signature and CRC-32C checksum")
    current = max(found, key=lambda h: h.sequence)
    if current.version != VHDX_VERSION:  # a later layout could place the region table or BAT differently
        raise UnsupportedDisk(
            f"{f.path}: VHDX header version {current.version} is not supported (MS-VHDX requires {VHDX_VERSION})"
        )
    return current


def _regions(f: PositionalFile) -> dict[uuid.UUID, tuple[int, int]]:
    for off in _REGION_OFFSETS:
        raw = _read(f, off, 64 * KiB, "region table")
        if raw[:4] != b"regi" or not _check_crc(raw):
            continue
        count = struct.unpack_from("<I", raw, 8)[0]
        if count > 2047:
            continue
        out = {}
        for i in range(count):
            base = 16 + i * 32
            gid = _guid(raw[base : base + 16])
            file_off, length, required = struct.unpack_from("<QII", raw, base + 16)
            if required & 1 and gid not in (_BAT_GUID, _METADATA_GUID):
                raise UnsupportedDisk(f"{f.path}: VHDX requires region {gid}, which vmrepl does not know")
            out[gid] = (file_off, length)
        return out
    raise UnsupportedDisk(f"{f.path}: no VHDX region table has a valid signature and CRC-32C checksum")


def _geometry(f: PositionalFile, offset: int, length: int) -> Geometry:
    raw = _read(f, offset, min(length, 64 * KiB), "metadata table")
    if raw[:8] != b"metadata":
        raise UnsupportedDisk(f"{f.path}: VHDX metadata table has a bad signature")
    count = struct.unpack_from("<H", raw, 10)[0]
    items: dict[uuid.UUID, tuple[int, int]] = {}
    for i in range(min(count, 2047)):
        base = 32 + i * 32
        gid = _guid(raw[base : base + 16])
        item_off, item_len = struct.unpack_from("<II", raw, base + 16)
        items[gid] = (item_off, item_len)

    def item(gid: uuid.UUID, fmt: str, name: str) -> tuple[int, ...]:
        if gid not in items:
            raise UnsupportedDisk(f"{f.path}: VHDX metadata lacks {name}")
        item_off, item_len = items[gid]
        if item_len < struct.calcsize(fmt):
            raise UnsupportedDisk(f"{f.path}: VHDX metadata item {name} is too short")
        return struct.unpack(fmt, _read(f, offset + item_off, struct.calcsize(fmt), name))

    block_size, flags = item(_FILE_PARAMETERS, "<II", "file parameters")
    (virtual_size,) = item(_VIRTUAL_DISK_SIZE, "<Q", "virtual disk size")
    (sector,) = item(_LOGICAL_SECTOR_SIZE, "<I", "logical sector size")
    has_parent = bool(flags & 2) or _PARENT_LOCATOR in items
    if not (MiB <= block_size <= 256 * MiB and block_size & (block_size - 1) == 0):
        raise UnsupportedDisk(f"{f.path}: VHDX block size {block_size} is invalid")
    if sector not in (512, 4096):
        raise UnsupportedDisk(f"{f.path}: VHDX logical sector size {sector} is invalid")
    return Geometry(block_size, virtual_size, sector, has_parent)


class VhdxReader(DiskReader):
    def __init__(self, path: Path) -> None:
        self._file = PositionalFile(path)
        try:
            self._open()
        except BaseException:
            self._file.close()
            raise

    def _open(self) -> None:
        f = self._file
        if _read(f, 0, 8, "file identifier") != b"vhdxfile":
            raise UnsupportedDisk(f"{f.path} is not a VHDX file")
        header = _current_header(f)
        if header.log_guid.int != 0:
            raise UnsupportedDisk(
                f"{f.path}: the VHDX log has entries to replay; open the disk in Hyper-V (or mount it) "
                "so the host replays its log, then retry"
            )
        regions = _regions(f)
        if _BAT_GUID not in regions or _METADATA_GUID not in regions:
            raise UnsupportedDisk(f"{f.path}: VHDX region table lacks the BAT or the metadata region")
        g = _geometry(f, *regions[_METADATA_GUID])
        if g.has_parent:
            raise UnsupportedDisk(f"{f.path}: differencing VHDX (it has a parent); AVHDX chains are not supported yet")
        self.geometry = g
        self._blocks = -(-g.virtual_size // g.block_size)
        self._chunk_ratio = (1 << 23) * g.logical_sector_size // g.block_size
        bat_off, bat_len = regions[_BAT_GUID]
        entries = self._blocks + (self._blocks - 1) // self._chunk_ratio if self._blocks else 0
        if entries * 8 > bat_len:
            raise UnsupportedDisk(f"{f.path}: VHDX BAT region is too small for the disk")
        bat = _read(f, bat_off, entries * 8, "BAT")
        self._block_offsets = self._payload_offsets(bat, f.size())

    def _payload_offsets(self, bat: bytes, file_size: int) -> list[int]:
        """File offset of each payload block, or -1 where it reads as zeros."""
        offsets = []
        bs = self.geometry.block_size
        for i in range(self._blocks):
            entry = struct.unpack_from("<Q", bat, 8 * (i + i // self._chunk_ratio))[0]
            state = entry & 7
            if state == PAYLOAD_PARTIALLY_PRESENT:
                raise UnsupportedDisk(f"{self._file.path}: block {i} is partially present (a differencing disk)")
            if state != PAYLOAD_FULLY_PRESENT:
                offsets.append(-1)  # not present, undefined, zero, unmapped: never read
                continue
            off = (entry >> 20) * MiB
            if off < MiB or off + bs > file_size:
                raise DiskError(f"{self._file.path}: block {i} points outside the file ({off})")
            offsets.append(off)
        return offsets

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
