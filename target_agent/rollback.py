"""Rollback (undo) files: the old bytes of every block a session overwrites, saved before it does.

The replica disk file always holds the newest state, so failover to the newest point is immediate. A
session that writes a replica with a restore point first appends each block's old bytes and old digest to
`rollback/pending.undo` of the disk, and makes them durable (fdatasync) before the block's new bytes are
written. When the session's restore point is committed, the file becomes the rollback data of the previous
point (`rollback/<point id>.undo`): it takes the disk from the next point back to that one. A session that
fails and will not be resumed is undone by writing the saved blocks back. See docs/target-agent.md,
"Restore points", for the design and what it costs.

File layout: a 4 KiB header (magic, a JSON object: format, session, base point, block size, the base
point's disk size; CRC-32C), then records appended in the order the session first overwrote each block:
a 40-byte record header (magic, flags, block index, data length, the old xxh3-128 digest, CRC-32C over the
header and the data) and the block's old bytes (none for a block that read as zeros). A block has at most
one record per file: the first overwrite's old bytes are the point's.

Torn tails: records past the last fdatasync may be cut by a power cut in any way. Opening a file keeps the
valid prefix (every record whose CRC matches, up to the first that does not) and drops the rest; no data
write was issued for a dropped record (its block was written only after the record was durable), so the
block still holds the bytes the record would have restored.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import crc32c

from target_agent.file_format import check_format
from vmrepl.disk.fileio import PositionalFile, atomic_write, rename
from vmrepl.domain import MAX_BLOCK_SIZE, MAX_DISK_SIZE
from vmrepl.errors import FailedPrecondition, PathError
from vmrepl.names import check_name

UNDO_FORMAT = 1
HEADER_SIZE = 4096
_MAGIC = b"VMRPUNDO"
_RECORD = struct.Struct("<4sIQI16sI")  # magic, flags, block index, data length, old digest, crc32c
_RECORD_MAGIC = b"UNDR"
_ZERO = 1  # flags: the block read as zeros; no data stored
PENDING = "pending.undo"
SUFFIX = ".undo"


def block_size_ok(value: object) -> bool:
    """A block size a file the target did not write may claim: a power of two from 512 bytes (in-process
    tests use blocks below the API's 64 KiB) to the API's largest. 1 would size a digest file at 16 bytes per
    byte of disk; 2**40 would have a rollback allocate a 1 TiB buffer."""
    return (
        isinstance(value, int)
        and not isinstance(value, bool)
        and 512 <= value <= MAX_BLOCK_SIZE
        and value & (value - 1) == 0
    )


def disk_size_ok(value: object, *, empty: bool = False) -> bool:
    """A disk size a file the target did not write may claim: up to the API's largest (0 only if `empty`)."""
    low = 0 if empty else 1
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= MAX_DISK_SIZE


@dataclass(frozen=True)
class UndoHeader:
    session_id: str  # the session whose overwrites the file saves
    base_point_id: str  # the point the file takes the disk back to
    block_size: int
    disk_size: int  # the base point's disk size: a rollback truncates the disk back to it
    format: int = UNDO_FORMAT

    def encode(self) -> bytes:
        doc = json.dumps(asdict(self), sort_keys=True).encode()
        raw = _MAGIC + struct.pack("<I", len(doc)) + doc + struct.pack("<I", crc32c.crc32c(doc))
        if len(raw) > HEADER_SIZE:
            raise ValueError("rollback header too long")
        return raw + bytes(HEADER_SIZE - len(raw))

    @classmethod
    def decode(cls, raw: bytes, what: str) -> UndoHeader:
        if len(raw) < HEADER_SIZE or raw[:8] != _MAGIC:
            raise FailedPrecondition(f"{what} is not a vmrepl rollback file")
        (n,) = struct.unpack_from("<I", raw, 8)
        doc = raw[12 : 12 + n]
        if n > HEADER_SIZE - 16 or struct.unpack_from("<I", raw, 12 + n)[0] != crc32c.crc32c(doc):
            raise FailedPrecondition(f"{what}: the header's checksum does not match")
        try:
            values = json.loads(doc)
            check_format(what, values.get("format"), reads=UNDO_FORMAT)
            header = cls(**values)
        except (ValueError, TypeError) as e:
            raise FailedPrecondition(f"{what}: the header is not a rollback header: {e}") from e
        if not all(isinstance(v, str) for v in (header.session_id, header.base_point_id)):
            raise FailedPrecondition(f"{what}: the header's ids are not strings")
        try:  # the base point's id names the file this one becomes: never a path
            check_name("base_point_id", header.base_point_id)
        except PathError as e:
            raise FailedPrecondition(f"{what}: {e}") from e
        if not (block_size_ok(header.block_size) and disk_size_ok(header.disk_size, empty=True)):
            raise FailedPrecondition(f"{what}: the header's sizes are not sizes")
        return header


@dataclass(frozen=True, slots=True)
class Saved:
    """Where a block's old bytes are in the file; offset -1: the block read as zeros."""

    offset: int
    length: int
    digest: bytes


def create(path: Path, header: UndoHeader) -> None:
    """A new, empty rollback file, durable (file and directory entry) when this returns."""
    atomic_write(path, header.encode())


# Old bytes gathered before they are appended (and fdatasync'ed): a long zero extent or a fold saves many
# blocks, and only this much of them is held in memory at once.
APPEND_CHUNK = 64 * 1024 * 1024
Record = tuple[int, bytes | None, bytes]  # block index, old bytes (None: zeros), old digest


def _read_header(f: PositionalFile, path: Path) -> UndoHeader:
    head = bytearray(HEADER_SIZE)
    n = f.read_into(memoryview(head), 0)
    return UndoHeader.decode(bytes(head[:n]), f"rollback file {path.parent.parent.name}/{path.name}")


def read_header(path: Path) -> UndoHeader:
    """A rollback file's header alone: its records are neither read nor checked (opening an UndoFile reads
    and checks them all)."""
    f = PositionalFile(path, follow_links=False)
    try:
        return _read_header(f, path)
    finally:
        f.close()


class UndoFile:
    """One rollback file: its header, the index of its valid records, appends and reads."""

    def __init__(self, path: Path, *, writable: bool = False) -> None:
        self.path = path
        self._file = PositionalFile(path, writable=writable, follow_links=False)
        try:
            self.header = _read_header(self._file, path)
            self.index: dict[int, Saved] = {}
            self.end = HEADER_SIZE
            self.refresh()
            if writable and self._file.size() != self.end:
                self._file.truncate(self.end)  # a torn tail: appends go right after the valid prefix
                self._file.sync()
        except BaseException:
            self._file.close()
            raise

    @property
    def data_bytes(self) -> int:
        return self.end - HEADER_SIZE

    def refresh(self) -> None:
        """Index the valid records appended since the last look (another process or stream may append)."""
        size = self._file.size()
        pos = self.end
        head = bytearray(_RECORD.size)
        while pos + _RECORD.size <= size:
            if self._file.read_into(memoryview(head), pos) < _RECORD.size:
                break
            magic, flags, block, length, old_digest, crc = _RECORD.unpack(head)
            if magic != _RECORD_MAGIC or length > self.header.block_size or pos + _RECORD.size + length > size:
                break
            data = bytearray(length)
            self._file.read_into(memoryview(data), pos + _RECORD.size)
            if crc32c.crc32c(bytes(data), crc32c.crc32c(bytes(head[:-4]))) != crc:
                break
            if block not in self.index:
                at = -1 if flags & _ZERO else pos + _RECORD.size
                self.index[block] = Saved(at, length if not flags & _ZERO else 0, old_digest)
            pos += _RECORD.size + length
        self.end = pos

    def append_all(self, records: Iterable[Record]) -> None:
        """`append` for records made on the way (old bytes read as they go), APPEND_CHUNK bytes at a time;
        each chunk is durable before the next is gathered, all of them when this returns."""
        batch: list[Record] = []
        size = 0
        for record in records:
            batch.append(record)
            size += len(record[1] or b"")
            if size >= APPEND_CHUNK:
                self.append(batch)
                batch, size = [], 0
        self.append(batch)

    def append(self, records: list[Record]) -> None:
        """Save (block index, old bytes or None for zeros, old digest) for blocks not saved yet; durable
        when this returns."""
        out = bytearray()
        pos = self.end
        for block, data, old_digest in records:
            if block in self.index:
                continue
            body = b"" if data is None else data
            head = _RECORD.pack(_RECORD_MAGIC, _ZERO if data is None else 0, block, len(body), old_digest, 0)
            crc = crc32c.crc32c(body, crc32c.crc32c(head[:-4]))
            out += head[:-4] + struct.pack("<I", crc) + body
            at = -1 if data is None else pos + len(out) - len(body)
            self.index[block] = Saved(at, len(body), old_digest)
        if out:
            self._file.write(out, self.end)
            self._file.sync()
            self.end += len(out)

    def read_block(self, saved: Saved, buf: memoryview) -> None:
        """The saved old bytes into `buf` (zeros past the saved length: a short last block)."""
        if saved.offset < 0:
            buf[:] = bytes(len(buf))
            return
        n = self._file.read_into(buf[: saved.length], saved.offset)
        if n < saved.length:
            raise FailedPrecondition(f"rollback file {self.path.name} is shorter than its index")
        if len(buf) > saved.length:
            buf[saved.length :] = bytes(len(buf) - saved.length)

    def records(self) -> Iterator[tuple[int, Saved]]:
        return iter(sorted(self.index.items()))

    def fileno(self) -> int:
        return self._file.fd

    def close(self) -> None:
        self._file.close()


def fold(folder: Path, *, newer: str, older: str) -> None:
    """Fold `<newer>.undo` into `<older>.undo` before point `newer` is deleted: the result takes the disk
    from the point after `newer` straight back to `older` (for a block both saved, `older`'s bytes win: they
    are what the disk held at `older`). Written beside and renamed over `<older>.undo`, so a crash leaves
    the old file or the folded one; either reads `older` right while `<newer>.undo` still exists."""
    newer_path, older_path = folder / f"{newer}{SUFFIX}", folder / f"{older}{SUFFIX}"
    if not (newer_path.exists() and older_path.exists()):
        return  # nothing saved after `newer` on this disk, or `older` is not restorable anyway
    new, old = UndoFile(newer_path), UndoFile(older_path)
    tmp = folder / f"{older}{SUFFIX}.fold"
    try:
        header = UndoHeader(new.header.session_id, older, old.header.block_size, old.header.disk_size)
        create(tmp, header)
        out = UndoFile(tmp, writable=True)
        try:
            out.append_all(_records(old, skip=set()))
            out.append_all(_records(new, skip=set(old.index)))
        finally:
            out.close()
    finally:
        new.close()
        old.close()
    rename(tmp, older_path)


def _records(src: UndoFile, *, skip: set[int]) -> Iterator[Record]:
    """`src`'s records but those of `skip`, their old bytes read as they are asked for."""
    for block, saved in src.records():
        if block in skip:
            continue
        data: bytes | None = None
        if saved.offset >= 0:
            buf = bytearray(saved.length)
            src.read_block(saved, memoryview(buf))
            data = bytes(buf)
        yield block, data, saved.digest
