"""Test only: a simulated power cut for everything written through `PositionalFile`.

kill -9 keeps the page cache, so it never loses a write the program made; a power cut loses any subset
of the writes made since the file's last flush. With `VMREPL_TEST_POWERCUT_JOURNAL` set to a directory,
every writable `PositionalFile` of the process records, before it first changes a page after a flush,
the page's content as of that flush (its *pre-image*) in a journal file of the process; a flush of the
file records that everything before it is durable. After the process is killed, `cut` replays the
journals and, for every page changed since its file's last flush, puts the pre-image back or keeps the
new content, at random: one of the states a real power cut may leave. Files replaced by `atomic_write`
(write, fsync, rename, fsync-dir) are durable when it returns and are not journaled.

The journal costs a read of each page before its first write after a flush, so it is for tests; without
the variable nothing is recorded (one attribute test per write).
"""

from __future__ import annotations

import os
import random
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ENV = "VMREPL_TEST_POWERCUT_JOURNAL"
PAGE = 4096
_HEADER = struct.Struct("<cHQQ")  # kind, path length, offset, length
_WRITE, _SYNC = b"W", b"S"


class Journal:
    """The journal of one process: pre-images of pages changed since their file's last flush."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        # Named so that sorting the names orders the journals as the processes ran.
        name = f"{time.time_ns():020d}-{os.getpid()}.journal"
        self._fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._lock = threading.Lock()
        self._pending: dict[str, set[int]] = {}
        self._synced: set[str] = set()

    def before_write(self, fd: int, path: str, offset: int, length: int) -> None:
        """Record the pre-images of the pages [offset, offset+length) touches that are not yet recorded."""
        if length <= 0:
            return
        with self._lock:
            pages = self._pending.setdefault(path, set())
            first, end = offset // PAGE, -(-(offset + length) // PAGE)
            for page in range(first, end):
                if page not in pages:
                    pages.add(page)
                    old = os.pread(fd, PAGE, page * PAGE)
                    self._record(_WRITE, path, page * PAGE, old)

    def synced(self, path: str) -> None:
        """`path` was flushed: every unflushed write to it is durable now, this process's and those of
        earlier processes (killed with the writes still in the page cache) alike."""
        with self._lock:
            self._synced.add(path)
            self._pending.pop(path, None)
            if self._pending:
                self._record(_SYNC, path, 0, b"")
                return
            # Nothing of this process is pending: start the journal afresh, keeping only what later
            # journals must still say to earlier ones (which files this process has flushed).
            os.ftruncate(self._fd, 0)
            for name in sorted(self._synced):
                self._record(_SYNC, name, 0, b"")

    def _record(self, kind: bytes, path: str, offset: int, data: bytes) -> None:
        raw = path.encode()
        os.write(self._fd, _HEADER.pack(kind, len(raw), offset, len(data)) + raw + data)


_journals: dict[str, Journal] = {}
_journal_lock = threading.Lock()


def journal() -> Journal | None:
    """This process's journal when the test variable is set, else None."""
    directory = os.environ.get(ENV)
    if not directory:
        return None
    with _journal_lock:
        if directory not in _journals:
            _journals[directory] = Journal(Path(directory))
        return _journals[directory]


@dataclass
class CutReport:
    pages_changed: int = 0
    pages_lost: int = 0
    files: set[str] = field(default_factory=set)


def _read_records(path: Path) -> list[tuple[bytes, str, int, bytes]]:
    data = path.read_bytes()
    out, pos = [], 0
    while pos + _HEADER.size <= len(data):
        kind, plen, offset, length = _HEADER.unpack_from(data, pos)
        pos += _HEADER.size
        if pos + plen + length > len(data):
            break  # a record torn by the kill: its write had not started
        name = data[pos : pos + plen].decode()
        pos += plen
        out.append((kind, name, offset, data[pos : pos + length]))
        pos += length
    return out


def cut(directory: Path, rng: random.Random) -> CutReport:
    """Lose a random subset of the unflushed writes the journals record; the journals are consumed.
    Call only while no process that journals into `directory` is running."""
    pending: dict[str, dict[int, bytes]] = {}
    journals = sorted(directory.glob("*.journal"))
    for j in journals:
        for kind, name, offset, data in _read_records(j):
            if kind == _SYNC:
                pending.pop(name, None)
            else:
                pending.setdefault(name, {}).setdefault(offset, data)
    report = CutReport()
    for name, pages in pending.items():
        if not os.path.exists(name):
            continue
        fd = os.open(name, os.O_WRONLY)
        try:
            for offset, old in pages.items():
                report.pages_changed += 1
                if rng.random() < 0.5:
                    os.pwrite(fd, old, offset)
                    report.pages_lost += 1
                    report.files.add(name)
        finally:
            os.close(fd)
    for j in journals:
        j.unlink()
    return report
