"""Test only: record every file-system operation made through `vmrepl.disk.fileio`, and rebuild what a
power cut at any moment of the recording could have left on disk.

kill -9 keeps the page cache, so it never loses a write the program made; a power cut loses whatever the
file system had not made durable. This module is the evidence for the target's durability claims.

**Recording.** Off unless enabled (`fileio` asks `active()` at each operation: one global test and one
environment lookup when off). Two ways to enable it:

* in process (unit tests): `with recording(root) as rec:` snapshots the tree under `root` in memory and
  records the operations of this process until the block ends; `rec.log()` is the `OpLog`;
* in a real process: with `VMREPL_TEST_POWERCUT_JOURNAL` set to a directory, the process appends its
  operations to `<directory>/<start time>-<pid>.oplog`, one `os.write` per record (length, CRC-32, body),
  so a kill -9 at any instant leaves at most a torn last record, which `read_log` drops. `start(directory,
  root)` takes the snapshot before the process starts; `cut(directory, rng)` after it is killed rebuilds
  the tree as a power cut may have left it and starts a fresh recording from there.

Each operation is logged once it completed, with file identity by inode (a name may be renamed over or
unlinked; an inode number reused by a later create is a new file): create, write (offset and bytes),
truncate, punch, fsync/fdatasync of a file, mkdir, rename, hard link, remove, fsync of a directory. A sync also
records which operations it covers: those logged before it *started* (a write racing with the sync is
not covered).

**The model** (`crash_state`), the weakest one POSIX allows, applied to the snapshot in log order:

* a file's data operation (write, truncate, punch) is durable once a later fsync/fdatasync of that file
  covers it; a directory entry operation (create, mkdir, rename, link, remove) once a later fsync of its
  directory covers it (a rename between two directories: of both);
* every operation not yet durable survives or not, independently of the others; a write or a punch is
  split into its 4 KiB pages (aligned on the file), each kept or lost on its own; each is kept with one
  probability drawn per crash (0.1, 0.5 or 0.9), so states that keep almost all or almost none are seen.

Limits (what the model assumes or leaves out):

* a 4 KiB page write is atomic (no torn sectors inside a page);
* a write that extends a file extends it by the pages that survived: a file is never longer than its
  surviving data (a real file system may keep the new size with zeros, which reads as unwritten blocks);
* inode metadata (mode, times, owner) is not modelled; files are rebuilt with default modes;
* a kept entry operation applies to the inode it named, even if the entry operation that created that
  inode was lost (a rename keeps a file whose create was lost; a remove removes only the entry still
  naming the inode it removed): orderings a journaling file system would not produce, kept because a
  program must not depend on them;
* symbolic links are not modelled (`Snapshot.take` refuses them); a file with two names (hard links, made
  before or while recording) is rebuilt as one file under both names;
* an operation whose record a kill -9 tore is taken as never made, even if a later process's fsync
  made it durable (at most one operation per killed process);
* everything outside the root the recording began with is ignored.
"""

from __future__ import annotations

import json
import mmap
import os
import random
import shutil
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

ENV = "VMREPL_TEST_POWERCUT_JOURNAL"
PAGE = 4096

CREATE, MKDIR, WRITE, TRUNCATE, PUNCH = "create", "mkdir", "write", "truncate", "punch"
SYNC, RENAME, REMOVE, SYNC_DIR, LINK = "sync", "rename", "remove", "sync-dir", "link"
KINDS = (CREATE, MKDIR, WRITE, TRUNCATE, PUNCH, SYNC, RENAME, REMOVE, SYNC_DIR, LINK)  # append only: the log's codes
DATA_OPS = frozenset({WRITE, TRUNCATE, PUNCH})
ENTRY_OPS = frozenset({CREATE, MKDIR, RENAME, REMOVE, LINK})
SYNCS = frozenset({SYNC, SYNC_DIR})
KEEP_CHANCES = (0.1, 0.5, 0.9)


@dataclass(frozen=True, slots=True)
class Op:
    """One completed operation. `ino` is the file or directory it is about (written, synced, created,
    renamed, linked, removed); an entry operation also names its directory (`parent`) and entry (`name`),
    a rename the destination (`parent2`, `name2`), a hard link only the new entry (`parent2`, `name2`).
    A truncate's size is `offset`. A sync covers the ops of the log before index `covers`."""

    kind: str
    ino: int
    offset: int = 0
    length: int = 0
    data: bytes | memoryview = b""
    parent: int = 0
    name: str = ""
    parent2: int = 0
    name2: str = ""
    covers: int = 0


# ---- the log format: per record <body length, crc32(body)> + body

_FRAME = struct.Struct("<II")
_BODY = struct.Struct("<B6QHH")  # kind, ino, offset, length, parent, parent2, covers, name sizes


def encode(op: Op) -> bytes:
    name, name2 = op.name.encode(), op.name2.encode()
    body = (
        _BODY.pack(
            KINDS.index(op.kind), op.ino, op.offset, op.length, op.parent, op.parent2, op.covers, len(name), len(name2)
        )
        + name
        + name2
        + bytes(op.data)
    )
    return _FRAME.pack(len(body), zlib.crc32(body)) + body


def decode_all(raw: memoryview, *, base: int = 0, what: str = "log") -> list[Op]:
    """The records of one process's log; a torn last record (the writer killed mid-write) is dropped.
    `base` is the index of the first record in the whole log (sync covers are made absolute)."""
    out: list[Op] = []
    pos = 0
    while pos + _FRAME.size <= len(raw):
        size, crc = _FRAME.unpack_from(raw, pos)
        body = raw[pos + _FRAME.size : pos + _FRAME.size + size]
        if len(body) < size:
            break  # torn by a kill: the operation it describes had completed, its record had not
        if zlib.crc32(body) != crc or size < _BODY.size:
            raise ValueError(f"{what}: record {len(out)} is damaged")
        kind, ino, offset, length, parent, parent2, covers, n1, n2 = _BODY.unpack_from(body)
        at = _BODY.size
        name, name2 = bytes(body[at : at + n1]).decode(), bytes(body[at + n1 : at + n1 + n2]).decode()
        data = body[at + n1 + n2 :]
        kind_name = KINDS[kind]
        out.append(
            Op(
                kind_name,
                ino,
                offset,
                length,
                data,
                parent,
                name,
                parent2,
                name2,
                base + covers if kind_name in SYNCS else 0,
            )
        )
        pos += _FRAME.size + size
    return out


# ---- recording


class _MemorySink:
    def __init__(self) -> None:
        self.ops: list[Op] = []

    @property
    def count(self) -> int:
        return len(self.ops)

    def add(self, op: Op) -> None:
        self.ops.append(op if isinstance(op.data, bytes) else replace(op, data=bytes(op.data)))


class _FileSink:
    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        # Named so that sorting the names orders the logs as the processes ran.
        name = f"{time.time_ns():020d}-{os.getpid()}.oplog"
        self._fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.count = 0

    def add(self, op: Op) -> None:
        view = memoryview(encode(op))
        while view:
            view = view[os.write(self._fd, view) :]
        self.count += 1


def _parent_ino(path: str | os.PathLike[str]) -> int:
    return os.stat(os.path.dirname(os.path.abspath(path))).st_ino


class Recorder:
    """Logs the operations `vmrepl.disk.fileio` reports, in the order they completed."""

    def __init__(self, sink: _MemorySink | _FileSink) -> None:
        self._sink = sink
        self._lock = threading.Lock()

    def _emit(self, op: Op) -> None:
        with self._lock:
            self._sink.add(op)

    def mark(self) -> int:
        """Call just before a sync starts: what it will cover (pass it to `synced`)."""
        with self._lock:
            return self._sink.count

    def open(self, path: str | os.PathLike[str], flags: int, mode: int) -> int:
        """os.open that records a create (the file did not exist) or an O_TRUNC of an existing file."""
        created = False
        if flags & os.O_CREAT:
            try:
                fd = os.open(path, flags | os.O_EXCL, mode)
                created = True
            except FileExistsError:
                fd = os.open(path, flags & ~os.O_CREAT, mode)
        else:
            fd = os.open(path, flags, mode)
        try:
            ino = os.fstat(fd).st_ino
            if created:
                self._emit(Op(CREATE, ino, parent=_parent_ino(path), name=os.path.basename(path)))
            elif flags & os.O_TRUNC:
                self._emit(Op(TRUNCATE, ino, offset=0))
        except BaseException:
            os.close(fd)
            raise
        return fd

    def write(self, fd: int, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._emit(Op(WRITE, os.fstat(fd).st_ino, offset=offset, length=len(data), data=memoryview(data)))

    def truncate(self, fd: int, size: int) -> None:
        self._emit(Op(TRUNCATE, os.fstat(fd).st_ino, offset=size))

    def punch(self, fd: int, offset: int, length: int) -> None:
        self._emit(Op(PUNCH, os.fstat(fd).st_ino, offset=offset, length=length))

    def synced(self, fd: int, covers: int) -> None:
        self._emit(Op(SYNC, os.fstat(fd).st_ino, covers=covers))

    def synced_dir(self, fd: int, covers: int) -> None:
        self._emit(Op(SYNC_DIR, os.fstat(fd).st_ino, covers=covers))

    def made_dir(self, path: str | os.PathLike[str]) -> None:
        self._emit(Op(MKDIR, os.stat(path).st_ino, parent=_parent_ino(path), name=os.path.basename(path)))

    def renamed(self, ino: int, src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        self._emit(
            Op(
                RENAME,
                ino,
                parent=_parent_ino(src),
                name=os.path.basename(src),
                parent2=_parent_ino(dst),
                name2=os.path.basename(dst),
            )
        )

    def linked(self, ino: int, dst: str | os.PathLike[str]) -> None:
        self._emit(Op(LINK, ino, parent2=_parent_ino(dst), name2=os.path.basename(dst)))

    def removed(self, ino: int, path: str | os.PathLike[str]) -> None:
        self._emit(Op(REMOVE, ino, parent=_parent_ino(path), name=os.path.basename(path)))


class _Installed:
    """The recorder `recording` installed in this process, if any."""

    recorder: Recorder | None = None


_from_env: dict[str, Recorder] = {}
_env_lock = threading.Lock()


def active() -> Recorder | None:
    """The recorder of this process: the one `recording` installed, else the environment's, else None."""
    if _Installed.recorder is not None:
        return _Installed.recorder
    directory = os.environ.get(ENV)
    if not directory:
        return None
    rec = _from_env.get(directory)
    if rec is None:
        with _env_lock:
            rec = _from_env.get(directory)
            if rec is None:
                rec = _from_env[directory] = Recorder(_FileSink(Path(directory)))
    return rec


# ---- the snapshot the recording starts from


@dataclass
class Snapshot:
    """The tree under `root` when recording began, taken as durable: each directory's entries by inode,
    each file's content (in memory, or the path of a copy)."""

    root: Path
    root_ino: int
    dirs: dict[int, dict[str, int]] = field(default_factory=dict)
    files: dict[int, bytes | Path] = field(default_factory=dict)

    @classmethod
    def take(cls, root: Path, *, copy_into: Path | None = None) -> Snapshot:
        """Walk `root`: file contents kept in memory, or copied (sparse) into `copy_into`."""
        root = Path(os.path.realpath(root))
        snap = cls(root, os.stat(root).st_ino)
        if copy_into is not None:
            copy_into.mkdir(parents=True, exist_ok=True)
        snap._walk(root, copy_into)
        return snap

    def _walk(self, path: Path, copy_into: Path | None) -> None:
        entries: dict[str, int] = {}
        self.dirs[os.stat(path).st_ino] = entries
        for e in os.scandir(path):
            ino = e.inode()
            entries[e.name] = ino
            if e.is_symlink():
                raise ValueError(f"{e.path}: symbolic links are not modelled")
            if e.is_dir():
                self._walk(Path(e.path), copy_into)
            elif copy_into is None:
                self.files[ino] = Path(e.path).read_bytes()
            elif ino not in self.files:
                copy = copy_into / str(ino)
                with open(copy, "wb") as out:
                    _copy_sparse(Path(e.path), out.fileno(), os.path.getsize(e.path))
                self.files[ino] = copy

    def save(self, path: Path) -> None:
        doc = {
            "root": str(self.root),
            "root_ino": self.root_ino,
            "dirs": {str(k): v for k, v in self.dirs.items()},
            # Relative to the manifest, so the snapshot's folder may be moved as a whole.
            "files": {str(k): os.path.relpath(v, path.parent) for k, v in self.files.items() if isinstance(v, Path)},
        }
        path.write_text(json.dumps(doc))

    @classmethod
    def load(cls, path: Path) -> Snapshot:
        doc = json.loads(path.read_text())  # the harness's own file, written by save()
        snap = cls(Path(doc["root"]), int(doc["root_ino"]))
        snap.dirs = {int(k): {n: int(i) for n, i in v.items()} for k, v in doc["dirs"].items()}
        snap.files = {int(k): path.parent / v for k, v in doc["files"].items()}
        return snap


@dataclass
class OpLog:
    snapshot: Snapshot
    ops: list[Op]

    def __len__(self) -> int:
        return len(self.ops)


class Recording:
    """What `recording` yields: `position()` is the index the next operation will have (take it when a
    call returns to know which ops it made), `log()` the log so far."""

    def __init__(self, root: Path) -> None:
        self.snapshot = Snapshot.take(root)
        self._sink = _MemorySink()
        self.recorder = Recorder(self._sink)

    def position(self) -> int:
        return self.recorder.mark()

    def log(self) -> OpLog:
        return OpLog(self.snapshot, list(self._sink.ops))


@contextmanager
def recording(root: Path) -> Iterator[Recording]:
    """Record this process's file-system operations (every thread's) until the block ends."""
    if _Installed.recorder is not None:
        raise RuntimeError("a recording is already running in this process")
    rec = Recording(root)
    _Installed.recorder = rec.recorder
    try:
        yield rec
    finally:
        _Installed.recorder = None


# ---- reconstruction


@dataclass(frozen=True, slots=True)
class _Nodes:
    node: int
    parent: int = -1
    parent2: int = -1


def _resolve(log: OpLog) -> tuple[list[_Nodes], dict[int, bool]]:
    """Model nodes of each op (an inode number bound to the newest file created with it), and which
    nodes are directories."""
    bind: dict[int, int] = {}
    is_dir: dict[int, bool] = {}
    for d in log.snapshot.dirs:
        bind[d], is_dir[d] = d, True
    for f in log.snapshot.files:
        bind[f], is_dir[f] = f, False
    fresh = -1  # new nodes get negative ids: never an inode number

    def lookup(ino: int, directory: bool = False) -> int:
        nonlocal fresh
        if ino not in bind:
            bind[ino], is_dir[fresh] = fresh, directory
            fresh -= 1
        return bind[ino]

    out: list[_Nodes] = []
    for op in log.ops:
        if op.kind in (CREATE, MKDIR):
            parent = lookup(op.parent, True)
            bind.pop(op.ino, None)
            out.append(_Nodes(lookup(op.ino, op.kind == MKDIR), parent))
        elif op.kind in (RENAME, REMOVE):
            out.append(
                _Nodes(lookup(op.ino), lookup(op.parent, True), lookup(op.parent2, True) if op.kind == RENAME else -1)
            )
        elif op.kind == LINK:
            out.append(_Nodes(lookup(op.ino), -1, lookup(op.parent2, True)))
        else:
            out.append(_Nodes(lookup(op.ino, op.kind == SYNC_DIR)))
    return out, is_dir


def durable_flags(log: OpLog, upto: int) -> list[bool]:
    """For ops[0..upto]: made durable by a sync completed at or before `upto` (syncs themselves: True)."""
    nodes, _ = _resolve(log)
    return _durable(log.ops, nodes, upto)


def _durable(ops: list[Op], nodes: list[_Nodes], upto: int) -> list[bool]:
    best: dict[int, int] = {}  # node -> the largest `covers` of its syncs seen so far (later in the log)
    out = [False] * (upto + 1)
    for i in range(upto, -1, -1):
        op, n = ops[i], nodes[i]
        if op.kind in SYNCS:
            best[n.node] = max(best.get(n.node, 0), op.covers)
            out[i] = True
        elif op.kind in DATA_OPS:
            out[i] = best.get(n.node, 0) > i
        else:
            dirs = {n.parent, n.parent2} - {-1}
            out[i] = all(best.get(d, 0) > i for d in dirs)
    return out


def _pieces(op: Op) -> list[Op]:
    """A write or punch as one op per 4 KiB page it touches; anything else as itself."""
    if op.kind not in (WRITE, PUNCH):
        return [op]
    out = []
    pos, end = op.offset, op.offset + op.length
    while pos < end:
        nxt = min(end, (pos // PAGE + 1) * PAGE)
        a, b = pos - op.offset, nxt - op.offset
        out.append(replace(op, offset=pos, length=nxt - pos, data=op.data[a:b] if op.kind == WRITE else b""))
        pos = nxt
    return out


_Page = bytes | bytearray | memoryview | None  # None: a page of zeros


@dataclass
class _File:
    base: bytes | Path = b""
    valid: int = 0  # how much of `base` is still the file's (a truncate cuts it)
    size: int = 0
    pages: dict[int, _Page] = field(default_factory=dict)

    def _page(self, p: int) -> bytearray:
        cur = self.pages.get(p, b"") if p in self.pages else self._base_page(p)
        page = cur if isinstance(cur, bytearray) else bytearray(PAGE) if cur is None else bytearray(cur)
        page.extend(bytes(PAGE - len(page)))
        self.pages[p] = page
        return page

    def _base_page(self, p: int) -> bytes:
        lo, hi = p * PAGE, min(self.valid, (p + 1) * PAGE)
        if hi <= lo:
            return b""
        if isinstance(self.base, bytes):
            return self.base[lo:hi]
        with open(self.base, "rb") as f:
            f.seek(lo)
            return f.read(hi - lo)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        for piece in _pieces(Op(WRITE, 0, offset=offset, length=len(data), data=data)):
            p, at = divmod(piece.offset, PAGE)
            if piece.length == PAGE:
                self.pages[p] = piece.data
            else:
                self._page(p)[at : at + piece.length] = piece.data
        self.size = max(self.size, offset + len(data))

    def punch(self, offset: int, length: int) -> None:
        end = min(offset + length, self.size)  # punching keeps the size (FALLOC_FL_KEEP_SIZE)
        for piece in _pieces(Op(PUNCH, 0, offset=offset, length=max(0, end - offset))):
            p, at = divmod(piece.offset, PAGE)
            if piece.length == PAGE:
                self.pages[p] = None
            else:
                self._page(p)[at : at + piece.length] = bytes(piece.length)

    def truncate(self, size: int) -> None:
        if size < self.size:
            for p in [p for p in self.pages if p * PAGE >= size]:
                del self.pages[p]
            if size % PAGE and (size // PAGE in self.pages or size < self.valid):
                page = self._page(size // PAGE)
                page[size % PAGE :] = bytes(PAGE - size % PAGE)
            self.valid = min(self.valid, size)
        self.size = size

    def materialise(self, path: Path) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            if isinstance(self.base, bytes):
                os.write(fd, self.base[: self.valid])
            else:
                _copy_sparse(self.base, fd, self.valid)
            os.ftruncate(fd, self.size)
            for p in sorted(self.pages):
                lo = p * PAGE
                n = min(PAGE, self.size - lo)
                content = self.pages[p]
                if n <= 0 or (content is None and lo >= self.valid):
                    continue  # past the end, or zeros over a hole already
                os.pwrite(fd, bytes(n) if content is None else content[:n], lo)
        finally:
            os.close(fd)


def _copy_sparse(src: Path, fd: int, limit: int) -> None:
    """Copy src's first `limit` bytes into fd, leaving its holes as holes."""
    with open(src, "rb") as f:
        sfd, pos = f.fileno(), 0
        while pos < limit:
            try:
                start = os.lseek(sfd, pos, os.SEEK_DATA)
            except OSError:
                break  # no data after pos
            end = min(limit, os.lseek(sfd, start, os.SEEK_HOLE))
            at = start
            while at < end:
                chunk = os.pread(sfd, min(1 << 20, end - at), at)
                if not chunk:
                    break
                os.pwrite(fd, chunk, at)
                at += len(chunk)
            pos = max(end, start + 1)


@dataclass
class CutReport:
    upto: int
    keep_chance: float = 0.0
    pending: int = 0  # pieces (pages, entry ops, truncates) not yet durable at the cut
    lost: int = 0  # of which the cut dropped


class _Model:
    def __init__(self, snap: Snapshot, is_dir: dict[int, bool]) -> None:
        self.root = snap.root_ino
        self.is_dir = is_dir
        self.dirs: dict[int, dict[str, int]] = {d: dict(e) for d, e in snap.dirs.items()}
        self.files: dict[int, _File] = {}
        for ino, content in snap.files.items():
            size = len(content) if isinstance(content, bytes) else os.path.getsize(content)
            self.files[ino] = _File(content, size, size)

    def _dir(self, node: int) -> dict[str, int]:
        return self.dirs.setdefault(node, {})

    def _file(self, node: int) -> _File:
        return self.files.setdefault(node, _File())

    def apply(self, op: Op, n: _Nodes) -> None:
        if op.kind == CREATE:
            self.files[n.node] = _File()
            self._dir(n.parent)[op.name] = n.node
        elif op.kind == MKDIR:
            self.dirs[n.node] = {}
            self._dir(n.parent)[op.name] = n.node
        elif op.kind == WRITE:
            self._file(n.node).write(op.offset, op.data)
        elif op.kind == TRUNCATE:
            self._file(n.node).truncate(op.offset)
        elif op.kind == PUNCH:
            self._file(n.node).punch(op.offset, op.length)
        elif op.kind == RENAME:
            src = self._dir(n.parent)
            if src.get(op.name) == n.node:
                del src[op.name]
            self._dir(n.parent2)[op.name2] = n.node
        elif op.kind == LINK:
            self._dir(n.parent2)[op.name2] = n.node
        elif op.kind == REMOVE:
            d = self._dir(n.parent)
            if d.get(op.name) == n.node:
                del d[op.name]

    def build(self, node: int, path: Path, made: dict[int, Path] | None = None) -> None:
        # A file under two names is one file (a hard link survives a power cut as a link): code that checks
        # two names are one inode (a mount's base, a failback disk) sees what a real file system leaves.
        made = {} if made is None else made
        for name, child in sorted(self._dir(node).items()):
            if self.is_dir.get(child, False):
                (path / name).mkdir()
                self.build(child, path / name, made)
            elif child in made:
                os.link(made[child], path / name)
            else:
                self._file(child).materialise(path / name)
                made[child] = path / name


@dataclass
class CrashState:
    """What a power cut just after op `report.upto` left: `materialise` it into a directory."""

    _model: _Model
    report: CutReport

    def materialise(self, dest: Path) -> None:
        """Build the tree into `dest` (created if absent; it must be empty)."""
        dest.mkdir(parents=True, exist_ok=True)
        if any(dest.iterdir()):
            raise ValueError(f"{dest} is not empty")
        self._model.build(self._model.root, dest)


def crash_state(log: OpLog, upto: int, rng: random.Random, *, keep: Callable[[Op], bool] | None = None) -> CrashState:
    """A state a power cut just after op `upto` (-1: before the first) may leave: the durable ops, and a
    random subset of the others, applied in order to the snapshot (see the module's docstring). `keep`
    chooses the subset instead (called with each piece not yet durable), for a chosen worst case."""
    if not -1 <= upto < len(log.ops):
        raise IndexError(f"cut point {upto} is outside the log's {len(log.ops)} ops")
    nodes, is_dir = _resolve(log)
    durable = _durable(log.ops, nodes, upto)
    model = _Model(log.snapshot, is_dir)
    report = CutReport(upto, rng.choice(KEEP_CHANCES))
    for i in range(upto + 1):
        op = log.ops[i]
        if op.kind in SYNCS:
            continue
        if durable[i]:
            model.apply(op, nodes[i])
            continue
        for piece in _pieces(op):
            report.pending += 1
            if keep(piece) if keep is not None else rng.random() < report.keep_chance:
                model.apply(piece, nodes[i])
            else:
                report.lost += 1
    return CrashState(model, report)


def cut_points(log: OpLog, rng: random.Random, n: int = 200) -> list[int]:
    """Where to cut: just before and just after every sync, the end, and random ops up to `n` points
    (every point when the log has fewer)."""
    last = len(log.ops) - 1
    points = {last}
    for i, op in enumerate(log.ops):
        if op.kind in SYNCS:
            points.update((i - 1, i))
    candidates = [i for i in range(-1, last + 1) if i not in points]
    rng.shuffle(candidates)
    points.update(candidates[: max(0, n - len(points))])
    return sorted(points)


# ---- real processes: the log directory of VMREPL_TEST_POWERCUT_JOURNAL


def start(directory: Path, root: Path) -> None:
    """Before starting processes that record into `directory`: forget earlier logs and take the tree
    under `root` as the durable starting point."""
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("*.oplog"):
        old.unlink()
    fresh, snap_dir = directory / "snapshot.new", directory / "snapshot"
    shutil.rmtree(fresh, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    Snapshot.take(root, copy_into=fresh / "files").save(fresh / "manifest.json")
    shutil.rmtree(snap_dir, ignore_errors=True)
    fresh.rename(snap_dir)


def read_log(directory: Path) -> OpLog:
    """The snapshot `start` took and the ops every process logged since, in the order they ran."""
    snap = Snapshot.load(directory / "snapshot" / "manifest.json")
    ops: list[Op] = []
    for path in sorted(directory.glob("*.oplog")):
        if path.stat().st_size == 0:
            continue
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # write data stays on disk until used
        ops.extend(decode_all(memoryview(mm), base=len(ops), what=str(path)))
    return OpLog(snap, ops)


def cut(directory: Path, rng: random.Random, *, keep: Callable[[Op], bool] | None = None) -> CutReport:
    """After every recording process was killed: rebuild the root `start` named as a power cut at the
    end of the log may have left it (`keep` as for `crash_state`), and start recording afresh from there."""
    log = read_log(directory)
    state = crash_state(log, len(log.ops) - 1, rng, keep=keep)
    root = log.snapshot.root
    for child in list(root.iterdir()):
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    state.materialise(root)
    start(directory, root)
    return state.report
