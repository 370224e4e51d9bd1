"""Writing an exported restore point disk to a file: sparse, and never a file that looks complete unless it is.

The disk is written to FILE.partial (created here, exclusively, readable by its owner only: it holds the
VM's data) and renamed to FILE only after the stream said the disk is done and the file is flushed. A
stream that breaks, or an export that is interrupted, removes the partial file.

Raw: what the stream does not send stays a hole. VHDX: through the shared library's VHDX writer
(`vmrepl.disk.base.create_writer`), dynamic, where unsent blocks stay unallocated.
"""

from __future__ import annotations

import contextlib
import enum
import os
import stat
from collections.abc import Callable, Iterable
from pathlib import Path

from vmrepl.disk import base as disk_base
from vmrepl.disk.base import DiskWriter
from vmrepl.disk.fileio import sync_dir
from vmrepl.disk.raw import RawWriter
from vmrepl.domain import DiskFormat, check_disk_size
from vmrepl.errors import DiskError, FailedPrecondition, InvalidArgument
from vmrepl.extent import MiB
from vmrepl.v1 import common_pb2

MAX_CHUNK = 4 * MiB  # DiskChunk.data's bound
_NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0)
Progress = Callable[[int, int], None]  # (bytes of the disk written up to, the disk's size)
WriterFactory = Callable[[Path, int], DiskWriter]


class ExportFormat(enum.StrEnum):
    RAW = "raw"
    VHDX = "vhdx"


def raw_writer(path: Path, size: int) -> DiskWriter:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NO_FOLLOW | getattr(os, "O_BINARY", 0), 0o600)
    os.close(fd)
    try:
        writer = RawWriter(path)
        writer.resize(size)  # a sparse file of the disk's size: every range not written reads as zeros
    except BaseException:
        path.unlink()
        raise
    return writer


def writer_factory(fmt: ExportFormat) -> WriterFactory:
    """The writer of `fmt`."""
    if fmt is ExportFormat.RAW:
        return raw_writer

    def writer(path: Path, size: int) -> DiskWriter:
        if os.path.lexists(path):
            raise FailedPrecondition(f"{path} appeared while the export started")
        out = disk_base.create_writer(DiskFormat(fmt.value), path, size=size)
        try:  # the shared writer makes files group-readable (the target's): the VM's data is its owner's only
            os.chmod(path, 0o600)  # before any of the disk's data is written
        except BaseException:
            out.close()
            path.unlink()
            raise
        return out

    return writer


def partial_path(output: Path, *, force: bool) -> Path:
    """Where the export is written before it is complete; refuses an output it must not replace."""
    if output.is_symlink():
        raise InvalidArgument("--output", f"{output} is a symbolic link: name the file itself")
    if output.is_dir():
        raise InvalidArgument("--output", f"{output} is a directory: name the file to write")
    if not output.parent.is_dir():
        raise InvalidArgument("--output", f"{output.parent} is not a directory")
    if output.exists():
        if not stat.S_ISREG(output.stat().st_mode):
            raise InvalidArgument("--output", f"{output} is not a regular file")
        if not force:
            raise FailedPrecondition(f"{output} exists: --force replaces it")
    partial = output.with_name(output.name + ".partial")
    if os.path.lexists(partial):
        if not force or partial.is_symlink() or not partial.is_file():
            raise FailedPrecondition(f"{partial} exists (an interrupted export's?): remove it, or --force")
        partial.unlink()
    return partial


class ChunkCheck:
    """The stream's promises, checked: one disk size, data in offset order inside the disk, within bounds."""

    def __init__(self) -> None:
        self.size = -1
        self.end = 0

    def check(self, chunk: common_pb2.DiskChunk) -> None:
        if self.size < 0:
            self.size = check_disk_size("disk_size", chunk.disk_size)
        elif chunk.disk_size != self.size:
            raise DiskError(f"the disk's size changed mid-export ({self.size} then {chunk.disk_size})")
        if chunk.done:
            return
        n = len(chunk.data)
        if not 0 < n <= MAX_CHUNK or chunk.offset < self.end or chunk.offset + n > self.size:
            raise DiskError(f"a piece of {n} bytes at {chunk.offset} is out of order or outside the disk")
        self.end = chunk.offset + n


def write_export(
    chunks: Iterable[common_pb2.DiskChunk],
    output: Path,
    *,
    writer: WriterFactory = raw_writer,
    force: bool = False,
    progress: Progress = lambda _done, _size: None,
) -> int:
    """Write the stream's disk to `output` (via its .partial file); returns the disk's size."""
    partial = partial_path(output, force=force)
    check = ChunkCheck()
    out: DiskWriter | None = None
    made = False
    try:
        for chunk in chunks:
            check.check(chunk)
            if out is None:
                out = writer(partial, check.size)
                made = True  # the partial file is ours from here (created exclusively)
            if chunk.done:
                break
            out.write(chunk.data, chunk.offset)
            progress(check.end, check.size)
        else:
            raise DiskError("the export ended before the disk was done: nothing was written")
        out.flush()
        done, out = out, None
        done.close()
        os.replace(partial, output)
        sync_dir(output.parent)
    except BaseException:
        if out is not None:
            with contextlib.suppress(OSError, DiskError):
                out.close()
        if made:  # nothing of an unfinished export is kept
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
        raise
    progress(check.size, check.size)
    return check.size
