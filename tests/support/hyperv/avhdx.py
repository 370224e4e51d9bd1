"""Differencing VHDX (AVHDX) files as Hyper-V makes them for a checkpoint, written by the host model.

qemu-img cannot create a differencing VHDX, and vmrepl's own writer writes whole images only, so this module
lays one out with `vmrepl.disk.vhdx_format`'s codecs (file identifier, headers, region tables, metadata with a
parent locator, BAT with sector bitmap entries): the header area, an unused 1 MiB log, the BAT at 2 MiB, the
metadata region after it, then payload and sector bitmap blocks appended at MiB-aligned offsets.

Guest writes go in as Hyper-V's do: a block's first write allocates it PARTIALLY_PRESENT and sets the sector
bitmap bits of the sectors written (the others read from the parent); a block whose every bit is set becomes
FULLY_PRESENT. Writes are whole sectors (the model refuses others). No crash safety: the model is a test double.
"""

from __future__ import annotations

import struct
import uuid
from pathlib import Path

from vmrepl.disk.fileio import PositionalFile
from vmrepl.disk.vhdx_format import (
    BAT_GUID,
    HEADER_OFFSETS,
    METADATA_GUID,
    PAGE83_DATA,
    PAYLOAD_FULLY_PRESENT,
    PAYLOAD_NOT_PRESENT,
    PAYLOAD_PARTIALLY_PRESENT,
    REGION_OFFSETS,
    SB_BLOCK_PRESENT,
    Header,
    ParentLocator,
    bat_index,
    bitmap_index,
    chunk_ratio,
    differencing_bat_entries,
    entry,
    entry_offset,
    entry_state,
    pack_file_identifier,
    pack_metadata,
    pack_region_table,
    read_layout,
)
from vmrepl.extent import Extent, MiB, merge

SECTOR = 512
PHYSICAL_SECTOR = 4096
_LOG_OFFSET = MiB
_BAT_OFFSET = 2 * MiB
_ENTRY = struct.Struct("<Q")


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def _read(f: PositionalFile, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    if f.read_into(memoryview(buf), offset) != length:
        raise ValueError(f"{f.path}: short read at {offset}")
    return bytes(buf)


def data_write_guid(path: Path) -> uuid.UUID:
    """The DataWriteGuid in a VHDX's current header: what a child's parent_linkage must name."""
    f = PositionalFile(path)
    try:
        return read_layout(f).header.data_write_guid
    finally:
        f.close()


def locator(*, parent_linkage: uuid.UUID, relative_path: str, absolute_win32_path: str) -> ParentLocator:
    return ParentLocator(
        {
            "parent_linkage": "{" + str(parent_linkage).upper() + "}",
            "relative_path": relative_path,
            "absolute_win32_path": absolute_win32_path,
        }
    )


def create(path: Path, *, size: int, block_size: int, parent: ParentLocator) -> None:
    """A new empty differencing VHDX at `path` (refuses an existing file) whose parent is `parent`."""
    ratio = chunk_ratio(SECTOR, block_size)
    bat_length = _round_up(differencing_bat_entries(-(-size // block_size), ratio) * 8, MiB)
    meta_at = _BAT_OFFSET + bat_length
    meta = pack_metadata(
        block_size=block_size,
        virtual_size=size,
        page83=uuid.uuid4(),
        physical_sector_size=PHYSICAL_SECTOR,
        parent=parent,
    )
    header_guids = (uuid.uuid4(), uuid.uuid4())
    with open(path, "xb") as out:
        out.truncate(meta_at + MiB)
        for at, raw in [
            (0, pack_file_identifier("vmrepl test Hyper-V host")),
            *[(off, pack_region_table((_BAT_OFFSET, bat_length), (meta_at, MiB))) for off in REGION_OFFSETS],
            (meta_at, meta),
            *[
                (off, Header(i + 1, *header_guids, uuid.UUID(int=0), 0, 1, MiB, _LOG_OFFSET).pack())
                for i, off in enumerate(HEADER_OFFSETS)
            ],
        ]:
            out.seek(at)
            out.write(raw)


class Avhdx:
    """An open differencing VHDX: sector writes, its own present sectors, new parent locators."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = PositionalFile(path, writable=True)
        try:
            layout = read_layout(self._file)
        except BaseException:
            self._file.close()
            raise
        g = layout.geometry
        if not g.has_parent or layout.parent is None:
            self._file.close()
            raise ValueError(f"{path} is not a differencing VHDX")
        self.size, self.block_size = g.virtual_size, g.block_size
        self._ratio = layout.chunk_ratio
        self._header_slot, self._header = layout.header_slot, layout.header
        self._bat_at = layout.regions[BAT_GUID][0]
        self._meta_at = layout.regions[METADATA_GUID][0]
        p83_at, _ = layout.items[PAGE83_DATA]
        self._page83 = uuid.UUID(bytes_le=_read(self._file, p83_at, 16))
        self.parent = layout.parent
        self._bat = bytearray(layout.bat)
        self._end = _round_up(self._file.size(), MiB)

    def __enter__(self) -> Avhdx:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._file.fd >= 0:
            self._file.sync()
            self._file.close()

    def _get(self, index: int) -> int:
        return int(_ENTRY.unpack_from(self._bat, 8 * index)[0])

    def _set(self, index: int, value: int) -> None:
        _ENTRY.pack_into(self._bat, 8 * index, value)
        self._file.write(_ENTRY.pack(value), self._bat_at + 8 * index)

    def _allocate(self, length: int) -> int:
        slot = self._end
        self._end += _round_up(length, MiB)
        self._file.truncate(self._end)  # reads as zeros
        return slot

    def _bitmap(self, block: int) -> int:
        index = bitmap_index(block, self._ratio)
        value = self._get(index)
        if entry_state(value) != SB_BLOCK_PRESENT:
            value = entry(SB_BLOCK_PRESENT, self._allocate(MiB))
            self._set(index, value)
        return entry_offset(value)

    def write(self, data: bytes, offset: int) -> None:
        if offset % SECTOR or len(data) % SECTOR or offset < 0 or offset + len(data) > self.size:
            raise ValueError(f"{self.path}: a write of {len(data)} at {offset} is not whole sectors inside the disk")
        done = 0
        while done < len(data):
            block, within = divmod(offset + done, self.block_size)
            n = min(self.block_size - within, len(data) - done)
            self._write_block(block, within, data[done : done + n])
            done += n

    def _write_block(self, block: int, within: int, data: bytes) -> None:
        index = bat_index(block, self._ratio)
        value = self._get(index)
        if entry_state(value) not in (PAYLOAD_FULLY_PRESENT, PAYLOAD_PARTIALLY_PRESENT):
            value = entry(PAYLOAD_PARTIALLY_PRESENT, self._allocate(self.block_size))
            self._set(index, value)
        self._file.write(data, entry_offset(value) + within)
        if entry_state(value) == PAYLOAD_FULLY_PRESENT:
            return
        bitmap_at = self._bitmap(block)
        sectors_per_block = self.block_size // SECTOR
        first = (block % self._ratio) * sectors_per_block  # bit of the block's first sector in its chunk's bitmap
        bits = bytearray(_read(self._file, bitmap_at + first // 8, sectors_per_block // 8))
        for s in range(within // SECTOR, (within + len(data)) // SECTOR):
            bits[s // 8] |= 1 << (s % 8)
        self._file.write(bytes(bits), bitmap_at + first // 8)
        if bits.count(0xFF) == len(bits):
            self._set(index, entry(PAYLOAD_FULLY_PRESENT, entry_offset(value)))

    def present(self) -> list[Extent]:
        """The logical ranges this file holds itself (everything else reads from its parent)."""
        out: list[Extent] = []
        sectors_per_block = self.block_size // SECTOR
        for block in range(-(-self.size // self.block_size)):
            value = self._get(bat_index(block, self._ratio))
            state, base = entry_state(value), block * self.block_size
            if state == PAYLOAD_FULLY_PRESENT:
                out.append(Extent(base, min(self.block_size, self.size - base)))
            elif state == PAYLOAD_PARTIALLY_PRESENT:
                bitmap_at = entry_offset(self._get(bitmap_index(block, self._ratio)))
                first = (block % self._ratio) * sectors_per_block
                bits = _read(self._file, bitmap_at + first // 8, sectors_per_block // 8)
                out += [
                    Extent(base + s * SECTOR, SECTOR) for s in range(sectors_per_block) if bits[s // 8] >> (s % 8) & 1
                ]
            elif state != PAYLOAD_NOT_PRESENT:
                raise ValueError(f"{self.path}: block {block} has state {state}, which the model never writes")
        return merge(out)

    def set_parent(self, parent: ParentLocator) -> None:
        """Point this file at another parent (after a merge), as Hyper-V rewrites the locator."""
        meta = pack_metadata(
            block_size=self.block_size,
            virtual_size=self.size,
            page83=self._page83,
            physical_sector_size=PHYSICAL_SECTOR,
            parent=parent,
        )
        self._file.write(meta + bytes(MiB - len(meta)), self._meta_at)
        self.parent = parent
        # The data the guest sees is unchanged (the new parent holds the merged view): a new FileWriteGuid
        # only. A new DataWriteGuid would break this file's own child, linked to it by that guid.
        self.new_data_write_guid(data=False)

    def new_data_write_guid(self, *, data: bool = True) -> None:
        """A new FileWriteGuid, and DataWriteGuid unless `data` is False, in both headers, one at a time
        (MS-VHDX 2.2.2.1): DataWriteGuid changes with the user-visible data, FileWriteGuid with any write."""
        file_guid = uuid.uuid4()
        data_guid = uuid.uuid4() if data else self._header.data_write_guid
        for _ in range(2):
            slot = 1 - self._header_slot
            h = self._header
            header = Header(
                h.sequence + 1, file_guid, data_guid, h.log_guid, h.log_version, h.version, h.log_length, h.log_offset
            )
            self._file.write(header.pack(), HEADER_OFFSETS[slot])
            self._header_slot, self._header = slot, header
        self._file.sync()
