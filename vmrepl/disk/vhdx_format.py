"""The VHDX on-disk format (MS-VHDX): its constants, structure codecs and validation, in one place.

The reader (`vhdx.py`) and the writer (`vhdx_writer.py`) both open a file through `read_layout`, so an
image the writer accepts is one the reader accepts, and the other way round. Only what a replica needs
is parsed: the current header (CRC-32C checked, highest sequence number of the two, version 1 as MS-VHDX
requires), the region table (CRC-32C checked), the metadata items for block size, virtual size, logical
sector size, the parent flag and the parent locator (MS-VHDX 2.6.2.6), and the BAT. A header whose log
GUID is set means the log holds entries to replay: the image is refused (the hypervisor replays logs; we
never guess). Differencing images (AVHDX) are parsed here; following their parents is the reader's job.

BAT entries of payload blocks interleave with sector-bitmap entries: after every `chunk_ratio` payload
entries comes one bitmap entry, where chunk_ratio = 2^23 * logical_sector_size / block_size.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass

import crc32c

from vmrepl.disk.fileio import PositionalFile
from vmrepl.errors import DiskError, UnsupportedDisk
from vmrepl.extent import KiB, MiB

FILE_SIGNATURE = b"vhdxfile"
CREATOR_SIZE = 512  # UTF-16 creator string after the signature (MS-VHDX 2.2.1)
HEADER_OFFSETS = (64 * KiB, 128 * KiB)
HEADER_SIZE = 4 * KiB
REGION_OFFSETS = (192 * KiB, 256 * KiB)
REGION_TABLE_SIZE = 64 * KiB
METADATA_TABLE_SIZE = 64 * KiB  # items follow the table, at offsets of at least 64 KiB into the region
HEADER_AREA = MiB  # file identifier, headers and region tables; the log and the regions come after
PAGE = 4 * KiB  # what the writer writes of the BAT at a time

BAT_GUID = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_GUID = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E")
FILE_PARAMETERS = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE = uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
PAGE83_DATA = uuid.UUID("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR_SIZE = uuid.UUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_SIZE = uuid.UUID("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR = uuid.UUID("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
VHDX_PARENT_LOCATOR_TYPE = uuid.UUID("B04AEFB7-D19E-4A81-B789-25B8E9445913")  # MS-VHDX 2.6.2.6
MAX_LOCATOR_ENTRIES = 64  # far more than the five keys MS-VHDX defines; a bound on what we parse

VHDX_VERSION = 1  # MS-VHDX 2.2.2.1: a header's Version MUST be 1
MIN_BLOCK_SIZE = MiB
MAX_BLOCK_SIZE = 256 * MiB
MAX_VIRTUAL_SIZE = 64 * 1024**4  # MS-VHDX 2.6.2.2: at most 64 TB

# Payload block states (MS-VHDX 2.5.1.1). Only FULLY/PARTIALLY_PRESENT hold data in a non-differencing
# image; every other state reads as zeros.
PAYLOAD_NOT_PRESENT = 0
PAYLOAD_UNDEFINED = 1
PAYLOAD_ZERO = 2
PAYLOAD_UNMAPPED = 3
PAYLOAD_FULLY_PRESENT = 6
PAYLOAD_PARTIALLY_PRESENT = 7
SB_BLOCK_PRESENT = 6  # sector bitmap entry state (MS-VHDX 2.5.1.2)

# Metadata entry flags (MS-VHDX 2.6.1.2).
META_IS_VIRTUAL_DISK = 2
META_IS_REQUIRED = 4

_HEADER = struct.Struct("<4sIQ16s16s16sHHIQ")  # signature .. LogOffset, then 4016 reserved bytes
_REGION_ENTRY = struct.Struct("<16sQII")
_META_ENTRY = struct.Struct("<16sIIII")
_LOCATOR_HEADER = struct.Struct("<16sHH")
_LOCATOR_ENTRY = struct.Struct("<IIHH")


def guid(raw: bytes) -> uuid.UUID:
    return uuid.UUID(bytes_le=raw)


def check_crc(block: bytes) -> bool:
    """CRC-32C over the structure with its checksum field (bytes 4..8) zeroed."""
    stored = struct.unpack_from("<I", block, 4)[0]
    return bool(crc32c.crc32c(block[:4] + b"\0\0\0\0" + block[8:]) == stored)


def seal(block: bytearray) -> bytes:
    """`block` with its checksum field (bytes 4..8) set to the CRC-32C of the whole structure."""
    block[4:8] = b"\0\0\0\0"
    struct.pack_into("<I", block, 4, crc32c.crc32c(bytes(block)))
    return bytes(block)


def chunk_ratio(logical_sector_size: int, block_size: int) -> int:
    return (1 << 23) * logical_sector_size // block_size


def bat_entries(blocks: int, ratio: int) -> int:
    """Entries a dynamic disk's BAT holds: every payload entry and the bitmap entries between them."""
    return blocks + (blocks - 1) // ratio if blocks else 0


def differencing_bat_entries(blocks: int, ratio: int) -> int:
    """Entries a differencing disk's BAT holds: every chunk with its sector bitmap entry (MS-VHDX 2.5)."""
    return -(-blocks // ratio) * (ratio + 1)


def bitmap_index(block: int, ratio: int) -> int:
    """Index in the BAT of the sector bitmap entry of the chunk holding payload block `block`."""
    chunk = block // ratio
    return (chunk + 1) * ratio + chunk


def bat_index(block: int, ratio: int) -> int:
    """Index in the BAT of payload block `block`'s entry."""
    return block + block // ratio


def entry(state: int, file_offset: int) -> int:
    return (file_offset // MiB) << 20 | state


def entry_state(value: int) -> int:
    return value & 7


def entry_offset(value: int) -> int:
    return (value >> 20) * MiB


@dataclass(frozen=True, slots=True)
class Header:
    sequence: int
    file_write_guid: uuid.UUID
    data_write_guid: uuid.UUID
    log_guid: uuid.UUID
    log_version: int
    version: int
    log_length: int
    log_offset: int

    def pack(self) -> bytes:
        raw = bytearray(HEADER_SIZE)
        _HEADER.pack_into(
            raw,
            0,
            b"head",
            0,
            self.sequence,
            self.file_write_guid.bytes_le,
            self.data_write_guid.bytes_le,
            self.log_guid.bytes_le,
            self.log_version,
            self.version,
            self.log_length,
            self.log_offset,
        )
        return seal(raw)

    @classmethod
    def parse(cls, raw: bytes) -> Header | None:
        """The header in `raw`, or None when its signature or checksum is wrong (torn or never written)."""
        if raw[:4] != b"head" or not check_crc(raw):
            return None
        _sig, _crc, seq, fw, dw, lg, log_version, version, log_length, log_offset = _HEADER.unpack_from(raw)
        return cls(seq, guid(fw), guid(dw), guid(lg), log_version, version, log_length, log_offset)


@dataclass(frozen=True, slots=True)
class Geometry:
    block_size: int
    virtual_size: int
    logical_sector_size: int
    has_parent: bool


@dataclass(frozen=True, slots=True)
class ParentLocator:
    """The parent locator of a differencing image: its key-value pairs (MS-VHDX 2.6.2.6)."""

    entries: dict[str, str]

    @property
    def linkage(self) -> uuid.UUID:
        """The DataWriteGuid the parent must have (`parent_linkage`)."""
        try:
            return uuid.UUID(self.entries["parent_linkage"])
        except (KeyError, ValueError) as e:
            raise UnsupportedDisk(f"the VHDX parent locator has no valid parent_linkage ({e})") from e

    def pack(self) -> bytes:
        table = _LOCATOR_HEADER.size + _LOCATOR_ENTRY.size * len(self.entries)
        head = bytearray(_LOCATOR_HEADER.pack(VHDX_PARENT_LOCATOR_TYPE.bytes_le, 0, len(self.entries)))
        body = bytearray()
        for key, value in self.entries.items():
            k, v = key.encode("utf-16-le"), value.encode("utf-16-le")
            head += _LOCATOR_ENTRY.pack(table + len(body), table + len(body) + len(k), len(k), len(v))
            body += k + v
        return bytes(head + body)

    @classmethod
    def parse(cls, raw: bytes, path: object) -> ParentLocator:
        if len(raw) < _LOCATOR_HEADER.size:
            raise UnsupportedDisk(f"{path}: VHDX parent locator is too short")
        kind, _reserved, count = _LOCATOR_HEADER.unpack_from(raw)
        if guid(kind) != VHDX_PARENT_LOCATOR_TYPE:
            raise UnsupportedDisk(f"{path}: VHDX parent locator type {guid(kind)} is not the VHDX one")
        if count > MAX_LOCATOR_ENTRIES or _LOCATOR_HEADER.size + count * _LOCATOR_ENTRY.size > len(raw):
            raise UnsupportedDisk(f"{path}: VHDX parent locator has an invalid entry count {count}")
        entries: dict[str, str] = {}
        for i in range(count):
            k_off, v_off, k_len, v_len = _LOCATOR_ENTRY.unpack_from(raw, _LOCATOR_HEADER.size + i * _LOCATOR_ENTRY.size)
            if k_off + k_len > len(raw) or v_off + v_len > len(raw) or k_len % 2 or v_len % 2:
                raise UnsupportedDisk(f"{path}: VHDX parent locator entry {i} lies outside the item")
            try:
                key = raw[k_off : k_off + k_len].decode("utf-16-le")
                entries[key] = raw[v_off : v_off + v_len].decode("utf-16-le")
            except UnicodeDecodeError as e:
                raise UnsupportedDisk(f"{path}: VHDX parent locator entry {i} is not UTF-16") from e
        return cls(entries)


@dataclass(frozen=True, slots=True)
class Layout:
    """Where everything is in an opened image, as `read_layout` validated it."""

    header_slot: int  # index into HEADER_OFFSETS of the current header
    header: Header
    regions: dict[uuid.UUID, tuple[int, int]]  # region GUID -> (file offset, length)
    items: dict[uuid.UUID, tuple[int, int]]  # metadata item GUID -> (file offset, length)
    geometry: Geometry
    bat: bytes  # the BAT entries in use (payload and bitmap), 8 bytes each
    parent: ParentLocator | None  # set exactly for a differencing image

    @property
    def blocks(self) -> int:
        return -(-self.geometry.virtual_size // self.geometry.block_size)

    @property
    def chunk_ratio(self) -> int:
        return chunk_ratio(self.geometry.logical_sector_size, self.geometry.block_size)


def read_exact(f: PositionalFile, offset: int, length: int, what: str) -> bytes:
    buf = bytearray(length)
    if f.read_into(memoryview(buf), offset) != length:
        raise UnsupportedDisk(f"{f.path}: truncated VHDX ({what} at {offset})")
    return bytes(buf)


def current_header(f: PositionalFile) -> tuple[int, Header]:
    found = []
    for slot, off in enumerate(HEADER_OFFSETS):
        header = Header.parse(read_exact(f, off, HEADER_SIZE, "header"))
        if header is not None:
            found.append((slot, header))
    if not found:
        raise UnsupportedDisk(f"{f.path}: no VHDX header has a valid signature and CRC-32C checksum")
    slot, current = max(found, key=lambda h: h[1].sequence)
    if current.version != VHDX_VERSION:  # a later layout could place the region table or BAT differently
        raise UnsupportedDisk(
            f"{f.path}: VHDX header version {current.version} is not supported (MS-VHDX requires {VHDX_VERSION})"
        )
    return slot, current


def regions(f: PositionalFile) -> dict[uuid.UUID, tuple[int, int]]:
    for off in REGION_OFFSETS:
        raw = read_exact(f, off, REGION_TABLE_SIZE, "region table")
        if raw[:4] != b"regi" or not check_crc(raw):
            continue
        count = struct.unpack_from("<I", raw, 8)[0]
        if count > 2047:
            continue
        out = {}
        for i in range(count):
            gid_raw, file_off, length, required = _REGION_ENTRY.unpack_from(raw, 16 + i * 32)
            gid = guid(gid_raw)
            if required & 1 and gid not in (BAT_GUID, METADATA_GUID):
                raise UnsupportedDisk(f"{f.path}: VHDX requires region {gid}, which vmrepl does not know")
            out[gid] = (file_off, length)
        return out
    raise UnsupportedDisk(f"{f.path}: no VHDX region table has a valid signature and CRC-32C checksum")


def pack_region_table(bat: tuple[int, int], metadata: tuple[int, int]) -> bytes:
    """The region table of an image with these (offset, length) regions, both marked required."""
    raw = bytearray(REGION_TABLE_SIZE)
    struct.pack_into("<4sIII", raw, 0, b"regi", 0, 2, 0)
    _REGION_ENTRY.pack_into(raw, 16, BAT_GUID.bytes_le, bat[0], bat[1], 1)
    _REGION_ENTRY.pack_into(raw, 48, METADATA_GUID.bytes_le, metadata[0], metadata[1], 1)
    return seal(raw)


def metadata_items(f: PositionalFile, offset: int, length: int) -> dict[uuid.UUID, tuple[int, int]]:
    """Metadata item GUID -> (file offset, length) of the metadata region at `offset`."""
    raw = read_exact(f, offset, min(length, METADATA_TABLE_SIZE), "metadata table")
    if raw[:8] != b"metadata":
        raise UnsupportedDisk(f"{f.path}: VHDX metadata table has a bad signature")
    count = struct.unpack_from("<H", raw, 10)[0]
    items: dict[uuid.UUID, tuple[int, int]] = {}
    for i in range(min(count, 2047)):
        gid_raw, item_off, item_len, _flags, _reserved = _META_ENTRY.unpack_from(raw, 32 + i * 32)
        items[guid(gid_raw)] = (offset + item_off, item_len)
    return items


def geometry(f: PositionalFile, items: dict[uuid.UUID, tuple[int, int]]) -> Geometry:
    def item(gid: uuid.UUID, fmt: str, name: str) -> tuple[int, ...]:
        if gid not in items:
            raise UnsupportedDisk(f"{f.path}: VHDX metadata lacks {name}")
        item_off, item_len = items[gid]
        if item_len < struct.calcsize(fmt):
            raise UnsupportedDisk(f"{f.path}: VHDX metadata item {name} is too short")
        return struct.unpack(fmt, read_exact(f, item_off, struct.calcsize(fmt), name))

    block_size, flags = item(FILE_PARAMETERS, "<II", "file parameters")
    (virtual_size,) = item(VIRTUAL_DISK_SIZE, "<Q", "virtual disk size")
    (sector,) = item(LOGICAL_SECTOR_SIZE, "<I", "logical sector size")
    has_parent = bool(flags & 2) or PARENT_LOCATOR in items
    if not (MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE and block_size & (block_size - 1) == 0):
        raise UnsupportedDisk(f"{f.path}: VHDX block size {block_size} is invalid")
    if sector not in (512, 4096):
        raise UnsupportedDisk(f"{f.path}: VHDX logical sector size {sector} is invalid")
    return Geometry(block_size, virtual_size, sector, has_parent)


def pack_metadata(
    *,
    block_size: int,
    virtual_size: int,
    page83: uuid.UUID,
    physical_sector_size: int,
    parent: ParentLocator | None = None,
) -> bytes:
    """The metadata region's table and items (the rest of the region is zeros), laid out as qemu-img does;
    with `parent`, a differencing image's (HasParent set, the parent locator item last)."""
    items = [
        (FILE_PARAMETERS, struct.pack("<II", block_size, 2 if parent else 0), META_IS_REQUIRED),
        (VIRTUAL_DISK_SIZE, struct.pack("<Q", virtual_size), META_IS_REQUIRED | META_IS_VIRTUAL_DISK),
        (PAGE83_DATA, page83.bytes_le, META_IS_REQUIRED | META_IS_VIRTUAL_DISK),
        (LOGICAL_SECTOR_SIZE, struct.pack("<I", 512), META_IS_REQUIRED | META_IS_VIRTUAL_DISK),
        (PHYSICAL_SECTOR_SIZE, struct.pack("<I", physical_sector_size), META_IS_REQUIRED | META_IS_VIRTUAL_DISK),
    ]
    if parent is not None:
        items.append((PARENT_LOCATOR, parent.pack(), META_IS_REQUIRED))
    raw = bytearray(METADATA_TABLE_SIZE + sum(len(data) for _, data, _ in items))
    struct.pack_into("<8sHH", raw, 0, b"metadata", 0, len(items))
    pos = METADATA_TABLE_SIZE
    for i, (gid, data, flags) in enumerate(items):
        _META_ENTRY.pack_into(raw, 32 + i * 32, gid.bytes_le, pos, len(data), flags, 0)
        raw[pos : pos + len(data)] = data
        pos += len(data)
    return bytes(raw)


def pack_file_identifier(creator: str) -> bytes:
    name = creator.encode("utf-16-le")[:CREATOR_SIZE]
    return FILE_SIGNATURE + name + bytes(CREATOR_SIZE - len(name))


def read_layout(f: PositionalFile) -> Layout:
    """Validate an image's structure (everything but the BAT entries) and say where everything is."""
    if read_exact(f, 0, 8, "file identifier") != FILE_SIGNATURE:
        raise UnsupportedDisk(f"{f.path} is not a VHDX file")
    slot, header = current_header(f)
    if header.log_guid.int != 0:
        raise UnsupportedDisk(
            f"{f.path}: the VHDX log has entries to replay; open the disk in Hyper-V (or mount it) "
            "so the host replays its log, then retry"
        )
    found = regions(f)
    if BAT_GUID not in found or METADATA_GUID not in found:
        raise UnsupportedDisk(f"{f.path}: VHDX region table lacks the BAT or the metadata region")
    items = metadata_items(f, *found[METADATA_GUID])
    g = geometry(f, items)
    parent = None
    if g.has_parent:
        if PARENT_LOCATOR not in items:
            raise UnsupportedDisk(f"{f.path}: differencing VHDX without a parent locator")
        loc_off, loc_len = items[PARENT_LOCATOR]
        parent = ParentLocator.parse(
            read_exact(f, loc_off, min(loc_len, METADATA_TABLE_SIZE), "parent locator"), f.path
        )
    blocks = -(-g.virtual_size // g.block_size)
    ratio = chunk_ratio(g.logical_sector_size, g.block_size)
    count = differencing_bat_entries(blocks, ratio) if g.has_parent else bat_entries(blocks, ratio)
    bat_off, bat_len = found[BAT_GUID]
    if count * 8 > bat_len:
        raise UnsupportedDisk(f"{f.path}: VHDX BAT region is too small for the disk")
    bat = read_exact(f, bat_off, count * 8, "BAT")
    return Layout(slot, header, found, items, g, bat, parent)


def payload_offsets(layout: Layout, file_size: int, path: object) -> list[int]:
    """File offset of each payload block, or -1 where it reads as zeros (a non-differencing image)."""
    offsets = []
    for i, (state, off) in enumerate(block_entries(layout, file_size, path)):
        if state == PAYLOAD_PARTIALLY_PRESENT:
            raise UnsupportedDisk(f"{path}: block {i} is partially present (a differencing disk)")
        offsets.append(off if state == PAYLOAD_FULLY_PRESENT else -1)  # others are never read
    return offsets


def block_entries(layout: Layout, file_size: int, path: object) -> list[tuple[int, int]]:
    """(state, file offset) of each payload block; the offset is checked where the state has data."""
    out = []
    bs = layout.geometry.block_size
    ratio = layout.chunk_ratio
    for i in range(layout.blocks):
        value = struct.unpack_from("<Q", layout.bat, 8 * bat_index(i, ratio))[0]
        state, off = entry_state(value), entry_offset(value)
        if state in (PAYLOAD_FULLY_PRESENT, PAYLOAD_PARTIALLY_PRESENT) and (off < HEADER_AREA or off + bs > file_size):
            raise DiskError(f"{path}: block {i} points outside the file ({off})")
        out.append((state, off))
    return out


def bitmap_offsets(layout: Layout, file_size: int, path: object) -> list[int]:
    """File offset of each chunk's sector bitmap block (1 MiB), or -1 where none is present."""
    ratio = layout.chunk_ratio
    out = []
    for chunk in range(-(-layout.blocks // ratio) if layout.geometry.has_parent else 0):
        value = struct.unpack_from("<Q", layout.bat, 8 * bitmap_index(chunk * ratio, ratio))[0]
        off = entry_offset(value)
        if entry_state(value) != SB_BLOCK_PRESENT:
            out.append(-1)
        elif off < HEADER_AREA or off + MiB > file_size:
            raise DiskError(f"{path}: sector bitmap {chunk} points outside the file ({off})")
        else:
            out.append(off)
    return out
