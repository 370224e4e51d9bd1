"""A replica disk on the target: its data file, its durable state, and the writes of one stream.

Layout of a disk directory (see docs/target-agent.md):
    data.raw     the replica, sparse
    digests.bin  xxh3-128 of every block, 16 bytes each; all-zero bytes: unknown
    state.json   session, pass, committed offset, session digest, state; replaced atomically

The committed offset only moves after the data and the digests below it are
flushed, and the state file is replaced with write-temp, fsync, rename,
fsync-dir: a crash at any point leaves a state whose offset is durable.
Digests beyond the committed offset of an interrupted session are marked
unknown when the next session prepares the disk, so a digest never vouches
for bytes that may not have reached the disk.

All methods block; the servicer calls them with `asyncio.to_thread`.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from vmrepl.batch import DATA, LZ4, CheckedExtent, SessionDigest
from vmrepl.block import DIGEST_SIZE, decompress, verify, zero_digest
from vmrepl.disk.fileio import PositionalFile, atomic_write
from vmrepl.disk.raw import RawWriter
from vmrepl.errors import FailedPrecondition, NotFound, TransferCancelled

PREPARED, RECEIVING, COMPLETE = "prepared", "receiving", "complete"
DATA_FILE = "data.raw"
STATE_FILE = "state.json"
DIGESTS_FILE = "digests.bin"
_DIGEST_CHUNK = 65536  # digests per write when a zero extent covers many blocks


@dataclass
class DiskState:
    disk_size: int
    block_size: int
    session_id: str
    state: str
    committed_offset: int = 0
    bytes_written: int = 0
    updated_at: float = 0.0
    pass_number: int = 0
    session_digest: str = ""  # hex, over this pass below committed_offset


class DigestStore:
    """One 16-byte xxh3-128 digest per block, at index offset // block_size."""

    def __init__(self, path: Path, *, block_size: int, disk_size: int) -> None:
        self._file = PositionalFile(path, writable=True, create=True)
        self.block_size = block_size
        self.disk_size = disk_size
        self.blocks = -(-disk_size // block_size)

    def resize(self) -> None:
        self._file.truncate(self.blocks * DIGEST_SIZE)

    def put(self, offset: int, digest: bytes) -> None:
        self._file.write(digest, offset // self.block_size * DIGEST_SIZE)

    def put_zero(self, offset: int, length: int) -> None:
        """Record the zero-block digest for every block of [offset, offset+length)."""
        bs = self.block_size
        first, end = offset // bs, -(-(offset + length) // bs)
        full_end = min(end, self.disk_size // bs)  # the disk's short last block has its own digest
        for lo in range(first, full_end, _DIGEST_CHUNK):
            n = min(_DIGEST_CHUNK, full_end - lo)
            self._file.write(zero_digest(bs) * n, lo * DIGEST_SIZE)
        if end > full_end:
            self._file.write(zero_digest(self.disk_size - full_end * bs), full_end * DIGEST_SIZE)

    def forget_from(self, offset: int) -> None:
        """Mark every block from `offset` on as unknown."""
        first = offset // self.block_size
        if first < self.blocks:
            self._file.punch_hole(first * DIGEST_SIZE, (self.blocks - first) * DIGEST_SIZE)

    def forget_all(self) -> None:
        self._file.truncate(0)
        self.resize()

    def read(self, first: int, count: int) -> bytes:
        buf = bytearray(count * DIGEST_SIZE)
        n = self._file.read_into(memoryview(buf), first * DIGEST_SIZE)
        return bytes(buf[:n]) + bytes(len(buf) - n)

    def flush(self) -> None:
        self._file.sync()

    def close(self) -> None:
        self._file.close()


def load_state(disk_dir: Path) -> DiskState:
    try:
        raw = json.loads((disk_dir / STATE_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise NotFound(f"replica disk {disk_dir.name} does not exist") from e
    return DiskState(**raw)


def save_state(disk_dir: Path, st: DiskState) -> None:
    st.updated_at = time.time()
    atomic_write(disk_dir / STATE_FILE, json.dumps(asdict(st), sort_keys=True).encode())


def prepare(
    disk_dir: Path, *, disk_size: int, block_size: int, session_id: str, resume_session_id: str = ""
) -> DiskState:
    """Create the disk or ready it for `session_id`. The same session and geometry keeps the committed
    offset; so does an unfinished transfer of `resume_session_id`, which `session_id` continues."""
    disk_dir.mkdir(parents=True, exist_ok=True)
    try:
        old: DiskState | None = load_state(disk_dir)
    except NotFound:
        old = None
    same = old is not None and old.disk_size == disk_size and old.block_size == block_size
    continued = same and old is not None and bool(resume_session_id) and old.session_id == resume_session_id
    resumable = same and old is not None and (old.session_id == session_id or continued)
    st = old if resumable and old is not None else DiskState(disk_size, block_size, session_id, PREPARED)
    st.session_id = session_id  # a continued transfer now belongs to this session
    writer = RawWriter(disk_dir / DATA_FILE, create=True)
    digests = DigestStore(disk_dir / DIGESTS_FILE, block_size=block_size, disk_size=disk_size)
    try:
        if writer.size != disk_size:
            writer.resize(disk_size)
        if old is not None and old.block_size != block_size:
            digests.forget_all()
        elif old is not None and not resumable and old.state != COMPLETE:
            digests.forget_from(old.committed_offset)  # the interrupted session's tail is uncertain
        digests.resize()
        writer.flush()
        digests.flush()
    finally:
        writer.close()
        digests.close()
    save_state(disk_dir, st)
    return st


def read_digests(disk_dir: Path, first: int, count: int) -> tuple[int, bytes]:
    """(block size, digests of blocks [first, first+count)), count 0 meaning to the end."""
    st = load_state(disk_dir)
    store = DigestStore(disk_dir / DIGESTS_FILE, block_size=st.block_size, disk_size=st.disk_size)
    try:
        if first > store.blocks:
            raise FailedPrecondition(f"block {first} is past the disk's {store.blocks} blocks")
        count = store.blocks - first if count == 0 else min(count, store.blocks - first)
        return st.block_size, store.read(first, count)
    finally:
        store.close()


@dataclass(frozen=True, slots=True)
class CommitPoint:
    offset: int
    final: bool
    digest: str
    written: int


class DiskGuard:
    """One per replica disk in the process: the newest stream wins, older ones stop touching the disk."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.generation = 0

    def claim(self) -> int:
        with self.lock:
            self.generation += 1
            return self.generation


class ReplicaStream:
    """The writes of one Transfer stream into one replica disk."""

    def __init__(
        self, disk_dir: Path, guard: DiskGuard, *, session_id: str, disk_size: int, block_size: int, pass_number: int
    ) -> None:
        st = load_state(disk_dir)
        if st.session_id != session_id:
            raise FailedPrecondition(
                f"replica disk {disk_dir.name} is not prepared for session {session_id} (it is for {st.session_id})"
            )
        if st.disk_size != disk_size or st.block_size != block_size:
            raise FailedPrecondition(
                f"replica disk {disk_dir.name} was prepared with size {st.disk_size} and block size "
                f"{st.block_size}, the stream says {disk_size} and {block_size}"
            )
        if pass_number < st.pass_number:
            raise FailedPrecondition(f"pass {pass_number} is older than the replica disk's pass {st.pass_number}")
        self.disk_dir = disk_dir
        self.state = st
        self._guard = guard
        self._generation = guard.claim()
        self._writer = RawWriter(disk_dir / DATA_FILE)
        self._digests = DigestStore(disk_dir / DIGESTS_FILE, block_size=block_size, disk_size=disk_size)
        if pass_number > st.pass_number:
            # A new pass of the same session re-runs the disk from the start.
            st.pass_number, st.committed_offset, st.session_digest, st.state = pass_number, 0, "", RECEIVING
            save_state(disk_dir, st)
        self.session_digest = SessionDigest(bytes.fromhex(st.session_digest))
        self._written = st.bytes_written
        self._closed = False

    @property
    def resume_offset(self) -> int:
        return self.state.committed_offset

    def _check_current(self) -> None:
        if self._guard.generation != self._generation:
            raise TransferCancelled("a newer stream for this replica disk took over")

    def apply(self, extents: list[CheckedExtent]) -> int:
        """Decode and verify every data extent, then write the batch. Returns raw data bytes written."""
        decoded: list[tuple[CheckedExtent, bytes | memoryview | None]] = []
        for e in extents:
            if e.kind == DATA:
                data: bytes | memoryview = decompress(e.payload, e.length) if e.encoding == LZ4 else e.payload
                verify(data, e.digest, offset=e.offset)
                decoded.append((e, data))
            else:
                decoded.append((e, None))
        written = 0
        with self._guard.lock:
            self._check_current()
            for e, payload in decoded:
                if payload is None:
                    self._writer.write_zeros(e.offset, e.length)
                    self._digests.put_zero(e.offset, e.length)
                else:
                    self._writer.write(payload, e.offset)
                    self._digests.put(e.offset, e.digest)
                    written += e.length
                self.session_digest.add(e.offset, e.length, e.kind, e.digest)
        self._written += written
        return written

    def mark(self, offset: int, *, final: bool) -> CommitPoint:
        """What a commit made now would record: call after applying the batch that ends at `offset`."""
        return CommitPoint(offset, final, self.session_digest.digest().hex(), self._written)

    def commit(self, point: CommitPoint) -> DiskState:
        """Flush, then durably record `point`. Later batches may be written while this flushes."""
        with self._guard.lock:
            self._check_current()
        # Outside the lock, so writing goes on: the flush covers everything written before it began,
        # which includes every batch up to the point.
        self._writer.flush()
        self._digests.flush()
        with self._guard.lock:
            self._check_current()
            if self._closed:  # the descriptors were closed (and maybe reused) under the flush
                raise TransferCancelled("the stream closed before its commit finished")
            st = self.state
            st.committed_offset, st.session_digest, st.bytes_written = point.offset, point.digest, point.written
            st.state = COMPLETE if point.final else RECEIVING
            save_state(self.disk_dir, st)
        return st

    def close(self) -> None:
        # Under the lock: a cancelled stream's write thread may still be inside apply(), and closing the
        # descriptor under it could let a reused descriptor number receive its bytes.
        with self._guard.lock:
            self._closed = True
            self._writer.close()
            self._digests.close()
