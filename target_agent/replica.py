"""A replica disk on the target: its data file, its durable state, and the writes of one stream.

Layout of a disk directory (see docs/target-agent.md):
    data.raw     the replica, sparse
    state.json   session, committed offset, state; replaced atomically

The committed offset only moves after the data below it is flushed, and the
state file is replaced with write-temp, fsync, rename, fsync-dir: a crash at
any point leaves a state whose offset is durable.

All methods block; the servicer calls them with `asyncio.to_thread`.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from vmrepl.batch import DATA, LZ4, CheckedExtent
from vmrepl.block import decompress, verify
from vmrepl.disk.fileio import atomic_write
from vmrepl.disk.raw import RawWriter
from vmrepl.errors import FailedPrecondition, NotFound, TransferCancelled

PREPARED, RECEIVING, COMPLETE = "prepared", "receiving", "complete"
DATA_FILE = "data.raw"
STATE_FILE = "state.json"


@dataclass
class DiskState:
    disk_size: int
    block_size: int
    session_id: str
    state: str
    committed_offset: int = 0
    bytes_written: int = 0
    updated_at: float = 0.0


def load_state(disk_dir: Path) -> DiskState:
    try:
        raw = json.loads((disk_dir / STATE_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise NotFound(f"replica disk {disk_dir.name} does not exist") from e
    return DiskState(**raw)


def save_state(disk_dir: Path, st: DiskState) -> None:
    st.updated_at = time.time()
    atomic_write(disk_dir / STATE_FILE, json.dumps(asdict(st), sort_keys=True).encode())


def prepare(disk_dir: Path, *, disk_size: int, block_size: int, session_id: str) -> DiskState:
    """Create the disk or ready it for `session_id`; same session and geometry keeps the committed offset."""
    disk_dir.mkdir(parents=True, exist_ok=True)
    try:
        st = load_state(disk_dir)
    except NotFound:
        st = None
    resumable = (
        st is not None and st.session_id == session_id and st.disk_size == disk_size and st.block_size == block_size
    )
    if st is None or not resumable:
        st = DiskState(disk_size=disk_size, block_size=block_size, session_id=session_id, state=PREPARED)
    writer = RawWriter(disk_dir / DATA_FILE, create=True)
    try:
        if writer.size != disk_size:
            writer.resize(disk_size)
        writer.flush()
    finally:
        writer.close()
    save_state(disk_dir, st)
    return st


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

    def __init__(self, disk_dir: Path, guard: DiskGuard, *, session_id: str, disk_size: int, block_size: int) -> None:
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
        self.disk_dir = disk_dir
        self.state = st
        self._guard = guard
        self._generation = guard.claim()
        self._writer = RawWriter(disk_dir / DATA_FILE)

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
                else:
                    self._writer.write(payload, e.offset)
                    written += e.length
        self.state.bytes_written += written
        return written

    def commit(self, offset: int, *, final: bool) -> DiskState:
        """Flush the data, then durably move the committed offset to `offset`."""
        with self._guard.lock:
            self._check_current()
            self._writer.flush()
            self.state.committed_offset = offset
            self.state.state = COMPLETE if final else RECEIVING
            save_state(self.disk_dir, self.state)
        return self.state

    def close(self) -> None:
        # Under the lock: a cancelled stream's write thread may still be inside apply(), and closing the
        # descriptor under it could let a reused descriptor number receive its bytes.
        with self._guard.lock:
            self._writer.close()
