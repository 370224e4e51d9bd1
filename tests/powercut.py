"""A simulated power cut over a folder tree: whatever was not fsynced may vanish.

`Recorder(root)` takes the tree as it is as durable, then wraps `os.fsync` and `os.fdatasync` in this
process: syncing a file records its bytes as durable (by inode); syncing a folder records its entries
(name -> inode) as durable. `Recorder.cut()` rewrites the tree to its durable state, as after a power
cut on a file system that keeps nothing unsynced: a file's unsynced writes and appends are gone, a file
created (even fsynced) in a folder that was not fsynced afterwards is gone, an unlink or rename not
followed by a folder sync is undone. `stop_at=N` makes the Nth sync raise `PowerCut` before it takes
effect, to cut at every point where the durable state changes.

Run a program under it as a real process (the state is saved when it ends, however it ends):

    python -m tests.powercut STATE_FILE ROOT MODULE [ARGS...]

then `Recorder.load(STATE_FILE).cut()` in the test.
"""

from __future__ import annotations

import os
import pickle
import runpy
import shutil
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


class PowerCut(BaseException):
    """Raised at the chosen sync: a BaseException, so the code under test cannot swallow it."""


# An entry of a folder: its kind ("file", "dir", "link"), its mode and a symbolic link's target.
_Node = tuple[str, int, str]


@dataclass
class Recorder:
    root: Path
    stop_at: int = 0
    syncs: int = 0
    # Durable state: each folder's entries and each file's bytes, by inode.
    entries: dict[int, dict[str, tuple[int, _Node]]] = field(default_factory=dict)
    data: dict[int, bytes] = field(default_factory=dict)
    root_ino: int = 0
    _saved: tuple[Callable[[int], None], Callable[[int], None]] | None = None

    def __post_init__(self) -> None:
        self.root_ino = os.stat(self.root).st_ino
        self._take_tree(self.root)

    def _take_tree(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            self._take(fd)
        finally:
            os.close(fd)
        for e in os.scandir(path):
            if e.is_dir(follow_symlinks=False):
                self._take_tree(Path(e.path))
            elif e.is_file(follow_symlinks=False):
                self.data[e.inode()] = Path(e.path).read_bytes()

    def _take(self, fd: int) -> None:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            listing: dict[str, tuple[int, _Node]] = {}
            for e in os.scandir(fd):
                s = e.stat(follow_symlinks=False)
                if e.is_symlink():
                    node: _Node = ("link", s.st_mode, os.readlink(e.name, dir_fd=fd))
                else:
                    node = ("dir" if e.is_dir(follow_symlinks=False) else "file", stat.S_IMODE(s.st_mode), "")
                listing[e.name] = (s.st_ino, node)
            self.entries[st.st_ino] = listing
        elif stat.S_ISREG(st.st_mode):
            # Opened again for reading: the synced descriptor may be write-only.
            self.data[st.st_ino] = Path(f"/proc/self/fd/{fd}").read_bytes()

    # -- recording -------------------------------------------------------------------------------

    def _sync(self, real: Callable[[int], None]) -> Callable[[int], None]:
        def synced(fd: int) -> None:
            self.syncs += 1
            if self.stop_at and self.syncs >= self.stop_at:
                raise PowerCut(f"power cut at sync {self.syncs}")
            real(fd)
            self._take(fd)

        return synced

    def start(self) -> Recorder:
        self._saved = (os.fsync, os.fdatasync)
        os.fsync, os.fdatasync = self._sync(os.fsync), self._sync(os.fdatasync)  # type: ignore[assignment]
        return self

    def stop(self) -> None:
        if self._saved is not None:
            os.fsync, os.fdatasync = self._saved  # type: ignore[assignment]
            self._saved = None

    def __enter__(self) -> Recorder:
        return self.start()

    def __exit__(self, *exc: object) -> bool:
        self.stop()
        return exc[0] is PowerCut  # the cut ends the block; the test goes on from the durable state

    def save(self, path: Path) -> None:
        path.write_bytes(pickle.dumps((self.root, self.root_ino, self.entries, self.data, self.syncs)))

    @classmethod
    def load(cls, path: Path) -> Recorder:
        root, root_ino, entries, data, syncs = pickle.loads(path.read_bytes())  # our own file, written by save()
        r = cls.__new__(cls)
        r.root, r.root_ino, r.entries, r.data, r.syncs = root, root_ino, entries, data, syncs
        r.stop_at, r._saved = 0, None
        return r

    # -- the cut ---------------------------------------------------------------------------------

    def cut(self) -> None:
        """Rewrite the tree under root to its durable state."""
        for child in self.root.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        self._build(self.root_ino, self.root)

    def _build(self, ino: int, path: Path) -> None:
        for name, (child, (kind, mode, target)) in self.entries.get(ino, {}).items():
            p = path / name
            if kind == "link":
                os.symlink(target, p)
            elif kind == "dir":
                p.mkdir()
                self._build(child, p)
                p.chmod(mode)
            else:
                p.write_bytes(self.data.get(child, b""))  # created and never synced: empty
                p.chmod(mode)


def main(argv: list[str]) -> None:
    state, root, module, *args = argv
    recorder = Recorder(Path(root)).start()
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        recorder.stop()
        recorder.save(Path(state))


if __name__ == "__main__":
    main(sys.argv[1:])
