"""A replica disk on the target: its data file, its durable state, and the writes of one stream.

Layout of a disk directory (see docs/target-agent.md):
    data.raw     the replica, sparse
    digests.bin  xxh3-128 of every block, 16 bytes each; all-zero bytes: unknown
    state.json   session, checkpoint, pass, committed offset, frontier, session digest, state; replaced
                 atomically

The rules that keep a replica equal to its source (docs/target-agent.md, "Integrity"):

* A transfer belongs to one session and one checkpoint. It resumes only for the same checkpoint (the
  same session, or a session that continues it); another checkpoint starts a new pass at offset 0.
* The committed offset only moves after the data and the digests below it are flushed, and the state
  file is replaced with write-temp, fsync, rename, fsync-dir: a crash at any point leaves a state whose
  offset is durable.
* The frontier bounds where a stream may have written past the committed offset: it is made durable
  before any write beyond it. After a crash nothing in [committed offset, frontier) can be trusted (the
  digest file's pages may have reached the disk while the data's did not), so the next prepare or
  stream of a new process marks those digests unknown before anything reads them.
* Once a restore point holds a session's transfer the disk is `committed`: no stream of that session
  and checkpoint writes it again, whatever ticket it shows.

All methods block; the servicer calls them with `asyncio.to_thread`.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from target_agent import mount_registry, rollback
from target_agent.file_format import UNVERSIONED, check_format
from vmrepl.batch import MAX_PASS, DecodedBatch, PassDigest
from vmrepl.block import DIGEST_SIZE, is_zero, zero_digest
from vmrepl.disk.base import DiskWriter, create_writer, open_writer
from vmrepl.disk.fileio import PositionalFile, atomic_write, make_dirs, read_bytes, remove, rename
from vmrepl.domain import DiskFormat
from vmrepl.errors import FailedPrecondition, NotFound, TransferCancelled
from vmrepl.extent import MiB

PREPARED, RECEIVING, COMPLETE, COMMITTED = "prepared", "receiving", "complete", "committed"
# No session's writes are kept: the disk equals its newest restore point (or has none), e.g. after a rollback.
IDLE = "idle"
STATES = (PREPARED, RECEIVING, COMPLETE, COMMITTED, IDLE)
DURABLE_STATES = frozenset({COMPLETE, COMMITTED, IDLE})  # every byte of the pass was flushed
ROLLBACK_DIR = "rollback"
REPLICA_FORMATS = ("raw", "vhdx")
DATA_FILE = "data.raw"  # the raw replica file; a VHDX replica is data.vhdx (data_file)
STATE_FILE = "state.json"
DIGESTS_FILE = "digests.bin"
# state.json's format: 1 had no "format" key (and "" as the digest of a pass that committed nothing);
# 2 records "format" and "digests_format".
STATE_FORMAT = 2
# digests.bin's format, recorded in state.json: 1 = one xxh3-128 per block, 16 bytes, all zero = unknown.
DIGESTS_FORMAT = 1
_DIGEST_CHUNK = 65536  # digests per write when a zero extent covers many blocks
# How far past the committed offset a commit lets the stream write before the next state save: the most
# a crash makes the next run send again, and how rarely the writer stops to move the frontier itself.
FRONTIER_STEP = 256 * MiB


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
    session_digest: PassDigest = field(default_factory=PassDigest)  # over this pass below committed_offset
    checkpoint_id: str = ""
    # Nothing past this offset was written by this pass; -1 (a state from before frontiers): unknown.
    frontier: int = -1
    # A transfer from this checkpoint failed sampled verification: its changed ranges are not to be trusted.
    tracking_failed: bool = False
    # The format of the disk's digests.bin (see DIGESTS_FORMAT).
    digests_format: int = UNVERSIONED
    # The replica file's format: "raw" (data.raw) or "vhdx" (data.vhdx).
    replica_format: str = "raw"
    # The session's controller said it will continue this transfer (EndReplicaSession keep_for_resume).
    resumable: bool = False
    # The last session whose writes were rolled back, and when (time.time()).
    rolled_back_session: str = ""
    rolled_back_at: float = 0.0
    # A rollback began writing the saved blocks back: until it ends, neither the session's data nor its
    # digests hold (a cut leaves blocks half restored), so nothing resumes the session and the next call
    # that touches the disk finishes the rollback.
    rolling_back: bool = False
    # The restore point this pass's overwrites are saved against (in rollback/pending.undo); "" for none. A
    # pass with one never writes, nor is rolled back, without that file: its loss (removed by hand) would
    # otherwise leave the newest point's blocks overwritten with no way back, while the replica says it is
    # at that point.
    base_point_id: str = ""

    def cover(self, end: int) -> bool:
        """Move the frontier to cover writes up to `end`, a step past the committed offset so few writes
        need a move of their own; True if it moved (the caller saves the state before writing)."""
        if end <= self.frontier:
            return False
        self.frontier = min(self.disk_size, max(end, self.committed_offset + FRONTIER_STEP))
        return True

    def uncertain(self) -> tuple[int, int]:
        """[lo, hi): where a crash may have left data that differs from its digests."""
        if self.state in DURABLE_STATES:
            return self.committed_offset, self.committed_offset
        hi = self.disk_size if self.frontier < 0 else max(self.frontier, self.committed_offset)
        return self.committed_offset, hi


class DigestStore:
    """One 16-byte xxh3-128 digest per block, at index offset // block_size."""

    def __init__(
        self,
        path: Path,
        *,
        block_size: int,
        disk_size: int,
        digests_format: int = DIGESTS_FORMAT,
        writable: bool = True,
    ) -> None:
        check_format(f"replica disk {path.parent.name}: {path.name}", digests_format, reads=DIGESTS_FORMAT)
        self._file = PositionalFile(path, writable=writable, create=writable, follow_links=False)
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

    def forget(self, lo: int, hi: int) -> None:
        """Mark every block that overlaps [lo, hi) as unknown."""
        first, end = lo // self.block_size, min(self.blocks, -(-hi // self.block_size))
        if first < end:
            self._file.punch_hole(first * DIGEST_SIZE, (end - first) * DIGEST_SIZE)

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


def check_folders(vm_dir: Path) -> None:
    """Refuse a replica whose own folders (`disks`, each disk's, each `rollback`) are symbolic links: the
    target follows none below a VM's folder, so a planted one cannot have it write, rename, remove or read
    outside the datastore root (nor roll another replica's disk back). Files are opened without following
    links (vmrepl.disk.fileio); this covers the folders above them, checked when a call first looks at the
    replica (restore_points.list_points)."""
    disks = vm_dir / "disks"
    _not_a_link(disks)
    _not_a_link(vm_dir / mount_registry.REGISTRY_DIR)
    if not disks.is_dir():
        return
    for entry in os.scandir(disks):
        _not_a_link(Path(entry.path))
        if entry.is_dir(follow_symlinks=False):
            _not_a_link(Path(entry.path) / ROLLBACK_DIR)


def _not_a_link(path: Path) -> None:
    if path.is_symlink():
        raise FailedPrecondition(
            f"{path.parent.name}/{path.name} is a symbolic link: the target reads and writes a replica's folders "
            "only where they are (move the folder itself back in place)"
        )


def load_state(disk_dir: Path) -> DiskState:
    try:
        raw = json.loads(read_bytes(disk_dir / STATE_FILE, follow_links=False).decode("utf-8"))
    except FileNotFoundError as e:
        raise NotFound(f"replica disk {disk_dir.name} does not exist") from e
    except (OSError, ValueError) as e:
        raise FailedPrecondition(f"replica disk {disk_dir.name}: {STATE_FILE} cannot be read: {e}") from e
    if not isinstance(raw, dict):
        raise FailedPrecondition(f"replica disk {disk_dir.name}: {STATE_FILE} is not a disk state")
    name = disk_dir.name
    check_format(f"replica disk {name}: {STATE_FILE}", raw.get("format", UNVERSIONED), reads=STATE_FORMAT)
    # Checked here too, so nothing opens a digest file it cannot read.
    check_format(f"replica disk {name}: {DIGESTS_FILE}", raw.get("digests_format", UNVERSIONED), reads=DIGESTS_FORMAT)
    known = {f.name for f in fields(DiskState)}
    values = {k: v for k, v in raw.items() if k in known}
    _check_values(f"replica disk {name}: {STATE_FILE}", values)
    try:
        values["session_digest"] = PassDigest.from_state(str(values.get("session_digest", "")))
    except ValueError as e:
        raise FailedPrecondition(f"replica disk {name}: {STATE_FILE}: session_digest: {e}") from e
    try:
        return DiskState(**values)
    except (TypeError, AttributeError, ValueError) as e:
        raise FailedPrecondition(f"replica disk {disk_dir.name}: {STATE_FILE} is not a disk state") from e


# The JSON types of DiskState's plain fields (the dataclass itself checks none).
_JSON_TYPES: dict[str, type | tuple[type, ...]] = {
    "int": int,
    "str": str,
    "float": (int, float),
    "bool": bool,
    "PassDigest": str,  # stored as hex (a null read as a zero digest, a wrong one for a resumed pass)
}


def _check_values(what: str, values: dict[str, object]) -> None:
    """Refuse a state whose values have the wrong type or range: loaded as they are, a string offset fails
    the next prepare with an internal error and a wrong state or size has it silently start afresh."""
    for f in fields(DiskState):
        kind = _JSON_TYPES.get(str(f.type))
        value = values.get(f.name)
        if kind is None or f.name not in values:
            continue
        if not isinstance(value, kind) or (isinstance(value, bool) and f.type != "bool"):
            raise FailedPrecondition(f"{what}: {f.name} is {_short(value)}, not a valid {f.type}")
    for key in ("disk_size", "block_size", "session_id", "state"):
        if key not in values:
            raise FailedPrecondition(f"{what}: {key} is missing")
    number = {k: v for k, v in values.items() if isinstance(v, int)}  # every int field, after the check above
    fine = {
        "disk_size": rollback.disk_size_ok(number["disk_size"]),
        "block_size": rollback.block_size_ok(number["block_size"]),
        "committed_offset": 0 <= number.get("committed_offset", 0) <= number["disk_size"],
        "frontier": number.get("frontier", -1) >= -1,
        "pass_number": 0 <= number.get("pass_number", 0) <= MAX_PASS,
        "state": values["state"] in STATES,
        "replica_format": values.get("replica_format", "raw") in REPLICA_FORMATS,
    }
    for key, ok in fine.items():
        if not ok:
            raise FailedPrecondition(f"{what}: {key} is {_short(values.get(key))}, out of range")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def save_state(disk_dir: Path, st: DiskState) -> None:
    st.updated_at = time.time()
    raw = asdict(st) | {"format": STATE_FORMAT, "session_digest": st.session_digest.to_state()}
    atomic_write(disk_dir / STATE_FILE, json.dumps(raw, sort_keys=True).encode())


@dataclass(frozen=True, slots=True)
class Base:
    """The restore point a session's writes are saved against: the newest point holding the disk."""

    point_id: str
    disk_size: int
    block_size: int


def _resumable(
    old: DiskState | None,
    *,
    disk_size: int,
    block_size: int,
    session_id: str,
    checkpoint_id: str,
    resume_session_id: str,
) -> bool:
    """An earlier transfer this prepare continues: same geometry, same checkpoint, first pass, and the same
    session or one that says it continues a held transfer. The checkpoint names the transfer, not the
    session id the controller passes: a session holding the checkpoint whose prepares never reached this
    target (it was down) hands the hold on, so the id can name a session this target never saw, and
    starting over there would leave a disk the controller counts as done with the point's old bytes. A
    second pass (a failed verification) is never continued: its change source is not the one a new proxy
    transfer would use."""
    if old is None or old.state in (COMMITTED, IDLE) or old.pass_number != 0 or old.rolling_back:
        return False
    if (old.disk_size, old.block_size, old.checkpoint_id) != (disk_size, block_size, checkpoint_id):
        return False
    return old.session_id == session_id or bool(resume_session_id)


def prepare(
    disk_dir: Path,
    *,
    guard: DiskGuard,
    disk_size: int,
    block_size: int,
    session_id: str,
    checkpoint_id: str,
    resume_session_id: str = "",
    base: Base | None = None,
    point_sessions: frozenset[str] = frozenset(),
    replica_format: str = "raw",
) -> DiskState:
    """Create the disk or ready it for `session_id` reading `checkpoint_id`. The same session and
    checkpoint keeps the committed offset; so does an unfinished transfer of `resume_session_id` from the
    same checkpoint, which `session_id` continues. Anything else first rolls back what an earlier session
    that made no restore point wrote, then starts a new pass at offset 0 whose overwrites are saved against
    `base` (the newest restore point holding the disk; None: there is none). `point_sessions` are the
    sessions that made restore points of the VM.

    Under the disk's guard, which it takes over: a stream still open on the disk (an earlier attempt's,
    whose proxy the controller gave up on) writes nothing after this. Its writes past the frontier this
    records would otherwise outlive a power cut in the digest file only, vouching for lost data."""
    make_dirs(disk_dir / ROLLBACK_DIR)
    with guard.lock:
        guard.claim_locked()
        old = _load_or_none(disk_dir)
        settle_locked(disk_dir, point_sessions)
        _refuse_committed(old, disk_dir.name, session_id=session_id, checkpoint_id=checkpoint_id)
        _refuse_format_change(old, disk_dir.name, replica_format)
        _refuse_rolled_back(old, disk_dir.name, resume_session_id=resume_session_id, checkpoint_id=checkpoint_id)
        resumable = _resumable(
            old,
            disk_size=disk_size,
            block_size=block_size,
            session_id=session_id,
            checkpoint_id=checkpoint_id,
            resume_session_id=resume_session_id,
        )
        # A failed verification condemns the checkpoint's change tracking, not one pass: a new pass from the
        # same checkpoint must compare digests (the controller reads it from the prepare's answer).
        distrusted = old is not None and old.checkpoint_id == checkpoint_id and old.tracking_failed
        if not resumable and old is not None:
            old = roll_back_locked(disk_dir, old)
        if resumable and old is not None:
            st = old
        else:
            st = DiskState(disk_size, block_size, session_id, PREPARED, replica_format=replica_format)
            if old is not None:
                st.rolled_back_session, st.rolled_back_at = old.rolled_back_session, old.rolled_back_at
            if base is not None:
                _start_rollback_file(disk_dir, base, session_id=session_id, block_size=block_size)
                st.base_point_id = base.point_id
        st.tracking_failed = distrusted
        st.session_id, st.checkpoint_id = session_id, checkpoint_id  # a continued transfer now belongs to this one
        st.resumable = False
        _ready_files(disk_dir, old, disk_size=disk_size, block_size=block_size, replica_format=replica_format)
        st.frontier = st.committed_offset
        save_state(disk_dir, st)
    return st


def data_file(disk_dir: Path, replica_format: str) -> Path:
    """The replica file: data.raw or data.vhdx."""
    return disk_dir / f"data.{DiskFormat(replica_format).value}"


def open_data(disk_dir: Path, replica_format: str, *, size: int = 0, block_size: int = 0) -> DiskWriter:
    """The replica file for writing; created (sparse) with `size` when it does not exist yet."""
    fmt = DiskFormat(replica_format)
    path = data_file(disk_dir, replica_format)
    if size and not path.exists():
        # VHDX blocks are 1 to 256 MiB: the replica's block size when it is one of those, else 1 MiB.
        return create_writer(fmt, path, size=size, block_size=max(block_size, MiB))
    return open_writer(fmt, path)


def _load_or_none(disk_dir: Path) -> DiskState | None:
    try:
        return load_state(disk_dir)
    except NotFound:
        return None


def _refuse_rolled_back(old: DiskState | None, name: str, *, resume_session_id: str, checkpoint_id: str) -> None:
    """A transfer whose writes were rolled back cannot be continued: a disk its controller counts as done
    would send nothing and keep the restore point's data under the new point."""
    if resume_session_id and old is not None and old.state == IDLE and old.checkpoint_id == checkpoint_id:
        raise FailedPrecondition(
            f"replica disk {name}: the transfer from checkpoint {checkpoint_id} was rolled back "
            f"(session {old.rolled_back_session}); a session cannot continue it (start from a new checkpoint)"
        )


def _refuse_format_change(old: DiskState | None, name: str, replica_format: str) -> None:
    if replica_format not in REPLICA_FORMATS:
        raise FailedPrecondition(f"replica disk {name}: format {replica_format!r} is not one of {REPLICA_FORMATS}")
    if old is not None and old.replica_format != replica_format:
        raise FailedPrecondition(
            f"replica disk {name} is kept as {old.replica_format}, the session asks for {replica_format}: "
            "formats are not converted (replicate to a new replica path)"
        )


def _start_rollback_file(disk_dir: Path, base: Base, *, session_id: str, block_size: int) -> None:
    """A new session's overwrites are saved against `base` from its first write on."""
    if base.block_size != block_size:
        raise FailedPrecondition(
            f"replica disk {disk_dir.name}: its restore points have {base.block_size}-byte blocks, the session "
            f"{block_size}: a block size change needs a new replica path"
        )
    header = rollback.UndoHeader(session_id, base.point_id, block_size, base.disk_size)
    rollback.create(disk_dir / ROLLBACK_DIR / rollback.PENDING, header)


def pending_header(disk_dir: Path) -> rollback.UndoHeader | None:
    path = disk_dir / ROLLBACK_DIR / rollback.PENDING
    return rollback.read_header(path) if path.exists() else None


def committed_pending(disk_dir: Path, header: rollback.UndoHeader, point_sessions: frozenset[str]) -> bool:
    """Is the disk's pending rollback file (with `header`) the rollback data of a committed point, to be
    renamed `<base point>.undo`? Yes when its session made a point, and when the session that made the
    point continued the transfer it was begun for (resume_session_id): the header names the session that
    began it, the disk's state the one that committed it, and both go back to the same base point."""
    if header.session_id in point_sessions:
        return True
    st = _load_or_none(disk_dir)
    return (
        st is not None
        and st.state == COMMITTED
        and st.session_id in point_sessions
        and st.base_point_id == header.base_point_id != ""
    )


def settle_locked(disk_dir: Path, point_sessions: frozenset[str]) -> None:
    """Finish a restore point commit a crash cut short: the pending rollback file of a session that made a
    restore point becomes the rollback data of the point before (call under the disk's guard)."""
    header = pending_header(disk_dir)
    if header is not None and committed_pending(disk_dir, header, point_sessions):
        folder = disk_dir / ROLLBACK_DIR
        rename(folder / rollback.PENDING, folder / f"{header.base_point_id}{rollback.SUFFIX}")


def roll_back_locked(disk_dir: Path, st: DiskState) -> DiskState:
    """Return the disk to its newest restore point: write back every block the pending rollback file saved,
    then forget the session (call under the disk's guard). A crash in the middle repeats it (the saved
    bytes are absolute). Returns the disk's state after; a disk at a point is returned as it is."""
    path = disk_dir / ROLLBACK_DIR / rollback.PENDING
    if st.state in (COMMITTED, IDLE) and not path.exists():
        return st
    size = st.disk_size
    if path.exists():
        undo = rollback.UndoFile(path)
        try:
            if not st.rolling_back:
                st.rolling_back = True
                save_state(disk_dir, st)  # durable before the first block is written back
            _write_back(disk_dir, st, undo)
            size = undo.header.disk_size  # the point's: a session that resized the disk is undone entirely
        finally:
            undo.close()
    else:  # no restore point to return to: keep what is durable, forget what a crash may have torn
        _refuse_lost_rollback_file(disk_dir, st)
        _ready_files(disk_dir, st, disk_size=st.disk_size, block_size=st.block_size, replica_format=st.replica_format)
    after = DiskState(size, st.block_size, "", IDLE, replica_format=st.replica_format)
    after.committed_offset = after.frontier = size
    after.rolled_back_session, after.rolled_back_at = st.session_id, time.time()
    after.digests_format = st.digests_format
    after.checkpoint_id = st.checkpoint_id  # the transfer rolled back: never continued (_refuse_rolled_back)
    save_state(disk_dir, after)
    if path.exists():
        remove(path)
    return after


def _refuse_lost_rollback_file(disk_dir: Path, st: DiskState) -> None:
    if st.base_point_id and st.state != IDLE:
        raise FailedPrecondition(
            f"replica disk {disk_dir.name}: {ROLLBACK_DIR}/{rollback.PENDING} is missing, yet session "
            f"{st.session_id} writes over restore point {st.base_point_id}: the blocks it overwrote cannot be "
            "restored, so the replica is not at that point (put the file back, or replicate to a new replica path)"
        )


def _write_back(disk_dir: Path, st: DiskState, undo: rollback.UndoFile) -> None:
    writer = open_data(disk_dir, st.replica_format)
    digests = DigestStore(
        disk_dir / DIGESTS_FILE,
        block_size=undo.header.block_size,
        disk_size=undo.header.disk_size,
        digests_format=st.digests_format,
    )
    try:
        bs = undo.header.block_size
        buf = bytearray(bs)
        for block, saved in undo.records():
            if block * bs >= undo.header.disk_size:
                continue  # past the point's end: the truncation below drops it
            if saved.offset < 0:
                writer.write_zeros(block * bs, min(bs, undo.header.disk_size - block * bs))
            else:
                undo.read_block(saved, memoryview(buf)[: saved.length])
                writer.write(memoryview(buf)[: saved.length], block * bs)
            digests.put(block * bs, saved.digest)
        if writer.size != undo.header.disk_size:
            writer.resize(undo.header.disk_size)
        digests.resize()
        writer.flush()
        digests.flush()
    finally:
        writer.close()
        digests.close()


def _refuse_committed(old: DiskState | None, name: str, *, session_id: str, checkpoint_id: str) -> None:
    if (
        old is not None
        and old.state == COMMITTED
        and (old.session_id, old.checkpoint_id) == (session_id, checkpoint_id)
    ):
        raise FailedPrecondition(
            f"replica disk {name}: a restore point holds session {session_id}'s transfer; it is never written again"
        )


def _ready_files(
    disk_dir: Path, old: DiskState | None, *, disk_size: int, block_size: int, replica_format: str
) -> None:
    """Size the data and digest files, forget what an interrupted pass may have torn, and flush both."""
    undo = _open_pending(disk_dir)
    writer = open_data(disk_dir, replica_format, size=disk_size, block_size=block_size)
    digests = DigestStore(
        disk_dir / DIGESTS_FILE,
        block_size=block_size,
        disk_size=disk_size,
        digests_format=old.digests_format if old is not None else DIGESTS_FORMAT,
    )
    try:
        if writer.size > disk_size and undo is not None:  # a smaller disk: save the tail before cutting it
            _save_old(disk_dir, writer, digests, undo, range(disk_size // block_size, -(-writer.size // block_size)))
        if writer.size != disk_size:
            writer.resize(disk_size)
        if old is not None and old.block_size != block_size:
            digests.forget_all()
        elif old is not None:
            _forget(digests, undo, *old.uncertain())
        digests.resize()
        writer.flush()
        digests.flush()
    finally:
        writer.close()
        digests.close()
        if undo is not None:
            undo.close()


def _open_pending(disk_dir: Path) -> rollback.UndoFile | None:
    path = disk_dir / ROLLBACK_DIR / rollback.PENDING
    return rollback.UndoFile(path, writable=True) if path.exists() else None


def _forget(digests: DigestStore, undo: rollback.UndoFile | None, lo: int, hi: int) -> None:
    """Mark the digests in [lo, hi) unknown: a crash may have left their blocks' data and digests apart.
    With a rollback file only the blocks it saved can have been written by the session; the others still
    hold the restore point's data and digests, which stay known."""
    if undo is None:
        digests.forget(lo, hi)
        return
    bs = digests.block_size
    for block in undo.index:
        if block * bs < hi and (block + 1) * bs > lo:  # the block overlaps [lo, hi)
            digests.forget(block * bs, (block + 1) * bs)


def _save_old(
    disk_dir: Path, writer: DiskWriter, digests: DigestStore, undo: rollback.UndoFile, blocks: Iterable[int]
) -> None:
    """Save the old bytes and digests of `blocks` not saved yet, durably, before they are overwritten: first
    into the point stores of the disk's TEST mounts (target_agent.mount_registry), then into the pending
    rollback file. In that order: a block the pending file holds is left out of the copy, so a cut between
    the two must leave it out of the pending file too (the next attempt copies it again, a no-op where the
    store holds it); a mount made later copies what the pending file holds itself."""
    fresh = sorted({b for b in blocks if b not in undo.index})
    mount_registry.before_overwrite(disk_dir, writer, fresh, digests.block_size)
    undo.append_all(_old_blocks(writer, digests, fresh))


def _old_blocks(writer: DiskWriter, digests: DigestStore, blocks: list[int]) -> Iterator[rollback.Record]:
    """Each block's old bytes (None for zeros) and digest, read as they are asked for."""
    bs = digests.block_size
    for block in blocks:
        buf = bytearray(bs)
        inside = max(0, min(bs, writer.size - block * bs))  # a short last block, or past a grown disk's old end
        if inside:
            writer.read_into(memoryview(buf)[:inside], block * bs)
        yield block, None if is_zero(buf) else bytes(buf[:inside]), digests.read(block, 1)


def read_digests(disk_dir: Path, first: int, count: int) -> tuple[int, bytes]:
    """(block size, digests of blocks [first, first+count)), count 0 meaning to the end."""
    st = load_state(disk_dir)
    store = DigestStore(
        disk_dir / DIGESTS_FILE,
        block_size=st.block_size,
        disk_size=st.disk_size,
        digests_format=st.digests_format,
        writable=False,
    )
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
    digest: PassDigest
    written: int


class DiskGuard:
    """One per replica disk in the process: the newest stream wins, older ones stop touching the disk.

    `fresh` until the first stream of this process: the disk's state then came from an earlier process,
    which may have died with writes past the committed offset unflushed."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.generation = 0

    @property
    def fresh(self) -> bool:
        return self.generation == 0

    def claim_locked(self) -> int:
        """Take the disk over (call with `lock` held): older streams' writes and commits now fail."""
        self.generation += 1
        return self.generation

    def claim(self) -> int:
        with self.lock:
            return self.claim_locked()


def check_stream(
    st: DiskState, name: str, *, session_id: str, checkpoint_id: str, disk_size: int, block_size: int, pass_number: int
) -> None:
    """May a stream of this session, checkpoint, geometry and pass write the disk in state `st`?"""
    if st.session_id != session_id:
        raise FailedPrecondition(
            f"replica disk {name} is not prepared for session {session_id} (it is for {st.session_id})"
        )
    if st.checkpoint_id != checkpoint_id:
        raise FailedPrecondition(
            f"replica disk {name} was prepared for checkpoint {st.checkpoint_id or '(none)'}, the stream reads "
            f"checkpoint {checkpoint_id}: a transfer resumes only from its own checkpoint"
        )
    if st.disk_size != disk_size or st.block_size != block_size:
        raise FailedPrecondition(
            f"replica disk {name} was prepared with size {st.disk_size} and block size "
            f"{st.block_size}, the stream says {disk_size} and {block_size}"
        )
    _refuse_committed(st, name, session_id=session_id, checkpoint_id=checkpoint_id)
    if st.rolling_back:
        raise FailedPrecondition(f"replica disk {name} is being rolled back to its newest restore point")
    if pass_number > MAX_PASS:
        raise FailedPrecondition(f"pass {pass_number} is past the last pass ({MAX_PASS})")
    if pass_number < st.pass_number:
        raise FailedPrecondition(f"pass {pass_number} is older than the replica disk's pass {st.pass_number}")
    if pass_number > st.pass_number and (pass_number != st.pass_number + 1 or st.state != COMPLETE):
        raise FailedPrecondition(
            f"pass {pass_number} may follow only a complete pass {pass_number - 1}; the replica disk is in "
            f"pass {st.pass_number}, {st.state}"
        )


class ReplicaStream:
    """The writes of one Transfer stream into one replica disk."""

    def __init__(
        self,
        disk_dir: Path,
        guard: DiskGuard,
        *,
        session_id: str,
        checkpoint_id: str,
        disk_size: int,
        block_size: int,
        pass_number: int,
    ) -> None:
        self.disk_dir = disk_dir
        self._guard = guard
        with guard.lock:  # checked and claimed at once, so a restore point commit cannot slip between
            st = load_state(disk_dir)  # NotFound for a disk never prepared, before any file is opened
            check_stream(
                st,
                disk_dir.name,
                session_id=session_id,
                checkpoint_id=checkpoint_id,
                disk_size=disk_size,
                block_size=block_size,
                pass_number=pass_number,
            )
            mount_registry.refuse_failover(disk_dir.parent.parent)  # replication is paused under a failover
            self._writer = open_data(disk_dir, st.replica_format)
            self._digests = DigestStore(
                disk_dir / DIGESTS_FILE, block_size=block_size, disk_size=disk_size, digests_format=st.digests_format
            )
            self._undo: rollback.UndoFile | None = None
            try:
                self._undo = _open_pending(disk_dir)  # None: no restore point to save the old bytes for
                if self._undo is None:
                    _refuse_lost_rollback_file(disk_dir, st)
                self._open_pass(st, pass_number, fresh=guard.fresh)
            except BaseException:
                self._close_files()
                raise
            self._generation = guard.claim_locked()
        self.state = st
        self.pass_digest = st.session_digest
        self._written = st.bytes_written
        self._closed = False

    def _open_pass(self, st: DiskState, pass_number: int, *, fresh: bool) -> None:
        if pass_number > st.pass_number:
            # The next pass of the same session re-runs the disk from the start; the last one was complete.
            st.pass_number, st.committed_offset, st.session_digest, st.state = pass_number, 0, PassDigest(), RECEIVING
            st.frontier, st.tracking_failed = 0, True  # only a failed sampled verification starts pass 1
            save_state(self.disk_dir, st)
            return
        lo, hi = st.uncertain()
        if fresh and hi > lo:
            # An earlier process may have died with writes past the committed offset unflushed.
            _forget(self._digests, self._undo, lo, hi)
            self._digests.flush()
            st.frontier = lo
            save_state(self.disk_dir, st)

    @property
    def resume_offset(self) -> int:
        return self.state.committed_offset

    def _check_current(self) -> None:
        if self._guard.generation != self._generation:
            raise TransferCancelled("a newer stream for this replica disk took over")

    def apply(self, batch: DecodedBatch) -> int:
        """Write a decoded (decompressed and verified) batch. Returns raw data bytes written."""
        with self._guard.lock:
            self._check_current()
            if batch.extents:
                self._cover(max(e.offset + e.length for e in batch.extents))
            if self._undo is not None:  # the old bytes are durable before any of the batch is written
                bs = self.state.block_size
                blocks = (b for e in batch.extents for b in range(e.offset // bs, -(-(e.offset + e.length) // bs)))
                _save_old(self.disk_dir, self._writer, self._digests, self._undo, blocks)
            for e in batch.extents:
                if e.data is None:
                    self._writer.write_zeros(e.offset, e.length)
                    self._digests.put_zero(e.offset, e.length)
                else:
                    self._writer.write(e.data, e.offset)
                    self._digests.put(e.offset, e.digest)
            self.pass_digest = self.pass_digest.merge(batch.digest)
        self._written += batch.data_bytes
        return batch.data_bytes

    def _cover(self, end: int) -> None:
        """Make the frontier cover `end` durably before anything is written below it (call under the lock)."""
        if self.state.cover(end):
            save_state(self.disk_dir, self.state)

    def mark(self, offset: int, *, final: bool) -> CommitPoint:
        """What a commit made now would record: call after applying the batch that ends at `offset`."""
        return CommitPoint(offset, final, self.pass_digest, self._written)

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
            st.cover(point.offset + FRONTIER_STEP // 2)  # moved with the commit: no extra save while streaming
            save_state(self.disk_dir, st)
        return st

    def close(self) -> None:
        # Under the lock: a cancelled stream's write thread may still be inside apply(), and closing the
        # descriptor under it could let a reused descriptor number receive its bytes.
        with self._guard.lock:
            self._closed = True
            self._close_files()

    def _close_files(self) -> None:
        self._writer.close()
        self._digests.close()
        if self._undo is not None:
            self._undo.close()
