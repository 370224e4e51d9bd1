"""A VHDX writer (MS-VHDX dynamic images) for replica disks on Hyper-V targets.

No maintained Python library writes VHDX (dissect.hypervisor and libvhdi read it only; see
docs/target-agent.md, "Replica disk formats"), so this module does, with the format's constants and
parsing from `vmrepl.disk.vhdx_format` (shared with the reader).

Layout of a new image, as `qemu-img create -f vhdx -o subformat=dynamic` lays it out: file identifier
at 0, headers at 64 and 128 KiB, region tables at 192 and 256 KiB, a 1 MiB log at 1 MiB (never used:
the log GUID stays zero), the BAT at 2 MiB (rounded up to whole MiB), the metadata region (1 MiB)
after it, payload blocks after that, each at a MiB-aligned offset. Logical sectors are 512 bytes,
physical 4096. Unallocated blocks read as zeros: NOT_PRESENT in a new image, ZERO once a block that
held data was zeroed whole. Zero data never allocates a block.

Crash safety. After `flush()` returns, everything written is durable. At any power cut (any subset of
the writes since the last completed flush lost, page by page) the file stays a valid VHDX whose every
block reads its content as of the last flush or something written after it, because:

1. Headers. The first change after open (or `create`) first writes a new header (sequence number + 1,
   new FileWriteGuid and DataWriteGuid as MS-VHDX 2.2.2.1 asks) to the slot that does not hold the
   current one and fsyncs, then the same with sequence + 2 to the other slot and fsyncs: at every
   moment one header with a valid CRC-32C is durable, and a torn one fails its CRC and is ignored.
2. New blocks. A block's first write lands in a free slot that no durable BAT entry points at (past
   the end of the file, or a slot freed by an earlier flush); its BAT entry stays in memory. `flush()`
   then (a) fdatasyncs the file, making the payload and the file's new length durable, (b) writes the
   BAT pages holding the changed entries, (c) fdatasyncs again. A BAT entry is 8 aligned bytes, never
   torn by a sector or page write; before (c) completes each entry is its old value or its new one,
   and a new one only points at payload made durable in (a).
3. Writes into a block already allocated in the durable BAT go in place: a cut leaves each page
   old or new, as on a raw disk.
4. Zeroing a whole block sets its entry to PAYLOAD_BLOCK_ZERO (in memory until the flush) and
   punches a hole in its slot at once: until the flush, the durable entry points at a slot that reads
   the old bytes or zeros, both allowed. The slot is reused only after the flush that makes the new
   entry durable, so no durable entry ever points at another block's data. Partial ranges are
   punched within the block (they read as zeros).
5. `resize` growing (within the BAT region's capacity) flushes, zeroes the new BAT entries and
   fsyncs, then writes the 8-byte virtual size item in place and fsyncs. Shrinking zeroes everything
   past the new size (4.) and flushes, then writes the size item and fsyncs: a cut before leaves the
   old size, reading zeros past the new one.

Free slots (holes between allocated blocks, found when the file is opened) are reused lowest first;
the file never shrinks.
"""

from __future__ import annotations

import heapq
import os
import struct
import threading
import uuid
from pathlib import Path

from vmrepl.block import fill_zero, is_zero
from vmrepl.disk.base import DiskWriter, register_writer
from vmrepl.disk.fileio import PositionalFile, link, remove, sync_dir
from vmrepl.disk.vhdx_format import (
    BAT_GUID,
    HEADER_AREA,
    HEADER_OFFSETS,
    MAX_BLOCK_SIZE,
    MAX_VIRTUAL_SIZE,
    METADATA_GUID,
    MIN_BLOCK_SIZE,
    PAGE,
    PAYLOAD_FULLY_PRESENT,
    PAYLOAD_ZERO,
    REGION_OFFSETS,
    VHDX_VERSION,
    VIRTUAL_DISK_SIZE,
    Header,
    Layout,
    bat_entries,
    bat_index,
    chunk_ratio,
    entry,
    entry_offset,
    entry_state,
    pack_file_identifier,
    pack_metadata,
    pack_region_table,
    payload_offsets,
    read_layout,
)
from vmrepl.domain import DiskFormat
from vmrepl.errors import AlreadyExists, DiskError, InvalidArgument, UnsupportedDisk
from vmrepl.extent import Extent, MiB, merge

LOGICAL_SECTOR = 512
PHYSICAL_SECTOR = 4096
LOG_OFFSET = MiB
LOG_LENGTH = MiB
BAT_OFFSET = 2 * MiB
METADATA_LENGTH = MiB
CREATOR = "vmrepl"
_ENTRY = struct.Struct("<Q")


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def _is_zero(view: memoryview) -> bool:
    # Data seldom starts with a zero sector: a look at the first one spares copying the rest to compare it.
    head = view[:LOGICAL_SECTOR].tobytes()
    if not is_zero(head):
        return False
    return len(view) <= LOGICAL_SECTOR or is_zero(view.tobytes())


def _check_geometry(size: int, block_size: int) -> None:
    if not (MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE and block_size & (block_size - 1) == 0):
        raise InvalidArgument("block_size", f"a VHDX block size is a power of two from 1 to 256 MiB, not {block_size}")
    if size <= 0 or size % LOGICAL_SECTOR or size > MAX_VIRTUAL_SIZE:
        raise InvalidArgument(
            "size", f"a VHDX disk size is a positive multiple of {LOGICAL_SECTOR} up to 64 TiB, not {size}"
        )


def _format(f: PositionalFile, *, size: int, block_size: int) -> None:
    """Write a new empty image into the empty file `f` and make it durable, headers last."""
    blocks = -(-size // block_size)
    bat_length = _round_up(max(1, bat_entries(blocks, chunk_ratio(LOGICAL_SECTOR, block_size))) * 8, MiB)
    metadata_offset = BAT_OFFSET + bat_length
    f.truncate(metadata_offset + METADATA_LENGTH)  # the log and the BAT (all NOT_PRESENT) read as zeros
    f.write(pack_file_identifier(CREATOR), 0)
    table = pack_region_table((BAT_OFFSET, bat_length), (metadata_offset, METADATA_LENGTH))
    for off in REGION_OFFSETS:
        f.write(table, off)
    meta = pack_metadata(
        block_size=block_size, virtual_size=size, page83=uuid.uuid4(), physical_sector_size=PHYSICAL_SECTOR
    )
    f.write(meta, metadata_offset)
    f.sync()  # everything the headers describe is durable before a header makes the file a VHDX
    file_guid, data_guid = uuid.uuid4(), uuid.uuid4()
    for slot, off in enumerate(HEADER_OFFSETS):
        header = Header(slot + 1, file_guid, data_guid, uuid.UUID(int=0), 0, VHDX_VERSION, LOG_LENGTH, LOG_OFFSET)
        f.write(header.pack(), off)
        f.sync()


class VhdxWriter(DiskWriter):
    """A dynamic VHDX opened for writing. Use `create_vhdx` for a new one; this opens an existing one."""

    def __init__(self, path: Path) -> None:
        self._file = PositionalFile(path, writable=True)
        self._lock = threading.Lock()
        try:
            self._load(read_layout(self._file))
        except BaseException:
            self._file.close()
            raise

    def _load(self, layout: Layout) -> None:
        g = layout.geometry
        if g.has_parent:  # replicas are always whole images; a differencing one is only ever read
            raise UnsupportedDisk(f"{self._file.path}: differencing VHDX; replica disks are never differencing")
        self._block_size = g.block_size
        self._size = g.virtual_size
        self._ratio = layout.chunk_ratio
        self._header_slot, self._header = layout.header_slot, layout.header
        self._bat_offset, self._bat_length = layout.regions[BAT_GUID]
        self._size_item = layout.items[VIRTUAL_DISK_SIZE][0]
        meta_off, meta_len = layout.regions[METADATA_GUID]
        if not meta_off <= self._size_item <= meta_off + meta_len - 8:  # `resize` writes it in place
            raise UnsupportedDisk(f"{self._file.path}: the VHDX virtual disk size item lies outside the metadata")
        self._bat = bytearray(layout.bat)  # the BAT as durable in the file
        self._pending: dict[int, int] = {}  # block -> entry written to the file at the next flush
        self._limbo: list[int] = []  # slots the durable BAT still points at, free after the next flush
        self._modified = False
        offsets = payload_offsets(layout, self._file.size(), self._file.path)
        self._free, self._end = self._free_slots(layout, offsets)

    def _free_slots(self, layout: Layout, offsets: list[int]) -> tuple[list[int], int]:
        """Slots no block uses (a heap) and the MiB-aligned end of the used space; refuses overlaps."""
        used = [(0, HEADER_AREA), (layout.header.log_offset, layout.header.log_length)]
        used += [layout.regions[BAT_GUID], layout.regions[METADATA_GUID]]
        used += [(off, self._block_size) for off in offsets if off >= 0]
        used += self._bitmap_blocks(layout)
        used.sort()
        free: list[int] = []
        pos = 0
        for off, length in used:
            if off < pos:
                raise UnsupportedDisk(f"{self._file.path}: VHDX blocks or regions overlap at file offset {off}")
            free += range(_round_up(pos, MiB), off - self._block_size + 1, self._block_size)
            pos = max(pos, off + length)
        end = _round_up(max(pos, self._file.size()), MiB)
        free += range(_round_up(pos, MiB), end - self._block_size + 1, self._block_size)
        heapq.heapify(free)
        return free, end

    def _bitmap_blocks(self, layout: Layout) -> list[tuple[int, int]]:
        """Sector-bitmap blocks a (dynamic) image should not have but might: never allocated over."""
        out = []
        for pos in range(self._ratio, len(layout.bat) // 8, self._ratio + 1):
            value = int(_ENTRY.unpack_from(layout.bat, 8 * pos)[0])
            if entry_state(value) == PAYLOAD_FULLY_PRESENT:  # SB_BLOCK_PRESENT has the same value, 6
                out.append((entry_offset(value), MiB))
        return out

    @property
    def size(self) -> int:
        return self._size

    @property
    def block_size(self) -> int:
        return self._block_size

    def _entry(self, block: int) -> int:
        pending = self._pending.get(block)
        if pending is not None:
            return pending
        return int(_ENTRY.unpack_from(self._bat, 8 * bat_index(block, self._ratio))[0])

    def _slot(self, block: int) -> int:
        """File offset of the block's payload, or -1 where it reads as zeros."""
        value = self._entry(block)
        return entry_offset(value) if entry_state(value) == PAYLOAD_FULLY_PRESENT else -1

    def _check_range(self, offset: int, length: int, what: str) -> None:
        if offset < 0 or length < 0 or offset + length > self._size:
            raise DiskError(f"{self._file.path}: {what} of {length} at {offset} is past the disk end ({self._size})")

    def _pieces(self, offset: int, length: int) -> list[tuple[int, int, int, int]]:
        """(block, offset within it, offset within the range, length) of each block the range touches."""
        out = []
        done = 0
        while done < length:
            block, within = divmod(offset + done, self._block_size)
            n = min(self._block_size - within, length - done)
            out.append((block, within, done, n))
            done += n
        return out

    def read_into(self, buf: memoryview, offset: int) -> None:
        self._check_range(offset, len(buf), "read")
        with self._lock:  # a slot freed and reused by a concurrent write must not be read
            for block, within, done, n in self._pieces(offset, len(buf)):
                target = buf[done : done + n]
                slot = self._slot(block)
                if slot < 0:
                    fill_zero(target)
                elif self._file.read_into(target, slot + within) != n:
                    raise DiskError(f"{self._file.path}: short read in block {block}")

    def allocated_extents(self) -> list[Extent]:
        with self._lock:
            bs = self._block_size
            blocks = -(-self._size // bs)
            out = [Extent(i * bs, min(bs, self._size - i * bs)) for i in range(blocks) if self._slot(i) >= 0]
        return merge(out)

    def write(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        view = memoryview(data).cast("B")
        self._check_range(offset, len(view), "write")
        with self._lock:
            self._begin_change()
            for block, within, done, n in self._pieces(offset, len(view)):
                piece = view[done : done + n]
                slot = self._slot(block)
                if slot < 0:
                    if _is_zero(piece):
                        continue  # zeros into a block that reads as zeros: nothing to allocate
                    slot = self._allocate()
                    self._pending[block] = entry(PAYLOAD_FULLY_PRESENT, slot)
                self._file.write(piece, slot + within)

    def _allocate(self) -> int:
        """A slot no durable or pending BAT entry points at, reading as zeros."""
        if self._free:
            slot = heapq.heappop(self._free)
            self._file.punch_hole(slot, self._block_size)  # it may hold bytes of an unflushed past
            return slot
        slot = self._end
        self._end += self._block_size
        self._file.truncate(self._end)
        return slot

    def write_zeros(self, offset: int, length: int) -> None:
        self._check_range(offset, length, "zero write")
        with self._lock:
            self._zero_locked(offset, length)

    def _zero_locked(self, offset: int, length: int) -> None:
        self._begin_change()
        for block, within, _done, n in self._pieces(offset, length):
            slot = self._slot(block)
            if slot < 0:
                continue
            whole = within == 0 and (n == self._block_size or block * self._block_size + n == self._size)
            if not whole:
                self._file.punch_hole(slot + within, n)
                continue
            self._pending[block] = entry(PAYLOAD_ZERO, 0)
            self._file.punch_hole(slot, self._block_size)
            durable = int(_ENTRY.unpack_from(self._bat, 8 * bat_index(block, self._ratio))[0])
            if entry_state(durable) == PAYLOAD_FULLY_PRESENT and entry_offset(durable) == slot:
                self._limbo.append(slot)  # the durable BAT points here until the next flush
            else:
                heapq.heappush(self._free, slot)  # allocated since the last flush: no durable entry

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        self._file.sync()  # payload, holes and the file's length durable before any entry points at them
        if not self._pending:
            return
        pages: set[int] = set()
        for block, value in self._pending.items():
            pos = 8 * bat_index(block, self._ratio)
            _ENTRY.pack_into(self._bat, pos, value)
            pages.add(pos // PAGE)
        for page in sorted(pages):
            chunk = bytes(self._bat[page * PAGE : (page + 1) * PAGE])
            self._file.write(chunk, self._bat_offset + page * PAGE)
        self._file.sync()
        self._pending.clear()
        for slot in self._limbo:
            heapq.heappush(self._free, slot)
        self._limbo.clear()

    def _begin_change(self) -> None:
        """Before the first change after open: new write GUIDs in both headers, one durable at a time."""
        if self._modified:
            return
        file_guid, data_guid = uuid.uuid4(), uuid.uuid4()
        for _ in range(2):
            slot = 1 - self._header_slot  # never overwrite the current header
            h = self._header
            header = Header(
                h.sequence + 1, file_guid, data_guid, h.log_guid, h.log_version, h.version, h.log_length, h.log_offset
            )
            self._file.write(header.pack(), HEADER_OFFSETS[slot])
            self._file.sync()
            self._header_slot, self._header = slot, header
        self._modified = True

    def resize(self, size: int) -> None:
        with self._lock:
            if size == self._size:
                return
            _check_geometry(size, self._block_size)
            if size < self._size:
                self._shrink_locked(size)
                return
            old_count = len(self._bat) // 8
            count = bat_entries(-(-size // self._block_size), self._ratio)
            if count * 8 > self._bat_length:
                raise UnsupportedDisk(
                    f"{self._file.path}: growing this VHDX to {size} bytes needs {count * 8} bytes of BAT; "
                    f"its BAT region holds {self._bat_length}. Create a new replica disk of that size"
                )
            self._begin_change()
            self._flush_locked()
            self._zero_tail()
            self._bat.extend(bytes((count - old_count) * 8))
            self._file.write(bytes((count - old_count) * 8), self._bat_offset + old_count * 8)
            self._file.sync()  # the new entries read NOT_PRESENT before the size says they are in use
            self._file.write(struct.pack("<Q", size), self._size_item)
            self._file.sync()
            self._size = size

    def _shrink_locked(self, size: int) -> None:
        """Shrink to `size` (a rollback of a session that grew the disk, a source disk that shrank): blocks past
        it are zeroed first (entries durable as ZERO, slots freed and punched), only then is the smaller size
        written. A cut before that leaves the old size reading zeros past `size`, which the rollback or the
        session that shrinks repeats; entries past the new size are never read (a grow writes them NOT_PRESENT
        before it writes the size)."""
        self._zero_locked(size, self._size - size)
        self._flush_locked()
        self._file.write(struct.pack("<Q", size), self._size_item)
        self._file.sync()
        self._size = size
        del self._bat[8 * bat_entries(-(-size // self._block_size), self._ratio) :]

    def _zero_tail(self) -> None:
        """The last block's bytes past the old size will be inside the disk: make sure they read zeros."""
        block, within = divmod(self._size, self._block_size)
        if within and (slot := self._slot(block)) >= 0:
            self._file.punch_hole(slot + within, self._block_size - within)

    def identity(self) -> tuple[int, int]:
        st = os.fstat(self._file.fd)
        return st.st_dev, st.st_ino

    def close(self) -> None:
        """Flush what is pending (so nothing written is forgotten) and close the file."""
        if self._file.fd < 0:
            return
        try:
            with self._lock:
                if self._pending:
                    self._flush_locked()
        finally:
            self._file.close()


def create_vhdx(path: Path, *, size: int, block_size: int = MiB) -> VhdxWriter:
    """A new empty dynamic VHDX at `path`, durable with its folder entry; refuses an existing file.

    The image is written under a temporary name and linked to `path` only when complete, so a crash
    never leaves a half-made image under the real name."""
    _check_geometry(size, block_size)
    if path.exists():
        raise AlreadyExists(f"{path} exists; a new replica disk is never written over an old one")
    tmp = path.with_name(f".{path.name}.creating")
    remove(tmp)  # left by a crash during an earlier create: never published
    try:
        f = PositionalFile(tmp, writable=True, create=True)
        try:
            _format(f, size=size, block_size=block_size)
        finally:
            f.close()
        link(tmp, path)  # fails if `path` appeared meanwhile: never replaces a file
    except FileExistsError as e:
        raise AlreadyExists(f"{path} exists; a new replica disk is never written over an old one") from e
    except OSError as e:
        raise DiskError(f"cannot create {path}: {e.strerror}") from e
    finally:
        remove(tmp)
    sync_dir(path.parent)
    return VhdxWriter(path)


register_writer(DiskFormat.VHDX, create=create_vhdx, open_existing=VhdxWriter)
