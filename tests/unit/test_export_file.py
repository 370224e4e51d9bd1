"""`vmrepl restore-points export` writing its file: sparse, complete or absent, and never over what it must
not replace (an existing file without --force, a symlink, a directory)."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.cli import export_file
from controller.cli.export_file import ExportFormat, write_export, writer_factory
from tests.conftest import need_tool
from vmrepl.disk.base import open_reader
from vmrepl.domain import DiskFormat
from vmrepl.errors import DiskError, FailedPrecondition, InvalidArgument
from vmrepl.extent import MiB
from vmrepl.v1 import common_pb2

SIZE = 3 * MiB


def chunks(*pieces: tuple[int, bytes], done: bool = True, size: int = SIZE) -> list[common_pb2.DiskChunk]:
    out = [common_pb2.DiskChunk(disk_size=size, offset=o, data=d) for o, d in pieces]
    return out + ([common_pb2.DiskChunk(disk_size=size, done=True)] if done else [])


def expected(*pieces: tuple[int, bytes]) -> bytes:
    buf = bytearray(SIZE)
    for o, d in pieces:
        buf[o : o + len(d)] = d
    return bytes(buf)


PIECES = ((4096, b"a" * 5000), (MiB, b"b" * 70000), (SIZE - 10, b"c" * 10))


def test_the_file_holds_the_disk_with_holes_where_nothing_was_sent_and_only_its_owner_reads_it(
    tmp_path: Path,
) -> None:
    out = tmp_path / "disk.raw"
    seen: list[tuple[int, int]] = []
    assert write_export(chunks(*PIECES), out, progress=lambda done, size: seen.append((done, size))) == SIZE
    assert out.read_bytes() == expected(*PIECES)
    assert out.stat().st_blocks * 512 < SIZE, "sparse"
    assert stat.S_IMODE(out.stat().st_mode) == 0o600, "a VM's data: its owner's only"
    assert seen[-1] == (SIZE, SIZE) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert not (tmp_path / "disk.raw.partial").exists()


def broken(items: list[common_pb2.DiskChunk], at: int) -> Iterator[common_pb2.DiskChunk]:
    for i, c in enumerate(items):
        if i == at:
            raise ConnectionError("the stream broke")
        yield c


@pytest.mark.parametrize(
    ("stream", "error"),
    [
        (chunks(*PIECES, done=False), DiskError),  # ended without done
        (iter([]), DiskError),
        (broken(chunks(*PIECES), 2), ConnectionError),
        (chunks((MiB, b"x"), (4096, b"y")), DiskError),  # out of order
        (chunks((0, b"x" * 10), (5, b"y")), DiskError),  # overlapping
        (chunks((SIZE - 1, b"xy")), DiskError),  # past the disk's end
        (chunks((0, b"")), DiskError),
        (chunks((0, b"x" * (4 * MiB + 1)), size=8 * MiB), DiskError),
        (
            [common_pb2.DiskChunk(disk_size=SIZE, offset=0, data=b"x"), common_pb2.DiskChunk(disk_size=1, done=True)],
            DiskError,
        ),
        ([common_pb2.DiskChunk(disk_size=0, done=True)], InvalidArgument),
    ],
)
def test_an_unfinished_or_inconsistent_export_leaves_no_file(tmp_path: Path, stream: Any, error: type) -> None:
    out = tmp_path / "disk.raw"
    with pytest.raises(error):
        write_export(stream, out)
    assert sorted(os.listdir(tmp_path)) == []


def test_an_existing_file_is_kept_unless_force_replaces_it(tmp_path: Path) -> None:
    out = tmp_path / "disk.raw"
    out.write_bytes(b"precious")
    with pytest.raises(FailedPrecondition, match="--force"):
        write_export(chunks(*PIECES), out)
    assert out.read_bytes() == b"precious"
    with pytest.raises(DiskError):  # a failed forced export keeps the old file too
        write_export(chunks(*PIECES, done=False), out, force=True)
    assert out.read_bytes() == b"precious"
    write_export(chunks(*PIECES), out, force=True)
    assert out.read_bytes() == expected(*PIECES)


def test_a_symlink_or_a_directory_is_never_written_through(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    link = tmp_path / "link.raw"
    link.symlink_to(victim)
    for force in (False, True):
        with pytest.raises(InvalidArgument, match="symbolic link"):
            write_export(chunks(*PIECES), link, force=force)
    assert victim.read_bytes() == b"keep me" and link.is_symlink()
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(InvalidArgument, match="directory"):
        write_export(chunks(*PIECES), folder, force=True)
    with pytest.raises(InvalidArgument, match="not a directory"):
        write_export(chunks(*PIECES), tmp_path / "missing" / "disk.raw")

    # A symlink planted where the partial file goes: refused, and never followed even with --force.
    out = tmp_path / "disk.raw"
    (tmp_path / "disk.raw.partial").symlink_to(victim)
    for force in (False, True):
        with pytest.raises(FailedPrecondition, match="interrupted"):
            write_export(chunks(*PIECES), out, force=force)
    assert victim.read_bytes() == b"keep me" and not out.exists()


def test_an_interrupted_exports_partial_file_is_replaced_only_with_force(tmp_path: Path) -> None:
    out = tmp_path / "disk.raw"
    (tmp_path / "disk.raw.partial").write_bytes(b"left over")
    with pytest.raises(FailedPrecondition, match="interrupted"):
        write_export(chunks(*PIECES), out)
    write_export(chunks(*PIECES), out, force=True)
    assert out.read_bytes() == expected(*PIECES) and not (tmp_path / "disk.raw.partial").exists()


def test_a_vhdx_export_reads_back_as_the_disk_and_qemu_img_checks_it(tmp_path: Path) -> None:
    out = tmp_path / "disk.vhdx"
    old_mask = os.umask(0o022)  # a usual umask: a file made with the default mode would be world-readable
    try:
        write_export(chunks(*PIECES), out, writer=writer_factory(ExportFormat.VHDX))
    finally:
        os.umask(old_mask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600, "a VM's data: its owner's only, in either format"
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "no temporary left beside it"
    reader = open_reader(DiskFormat.VHDX, out)
    try:
        buf = bytearray(reader.size)
        reader.read_into(memoryview(buf), 0)
    finally:
        reader.close()
    assert bytes(buf) == expected(*PIECES)
    need_tool("qemu-img")
    assert subprocess.run(["qemu-img", "check", "-q", "-f", "vhdx", str(out)], check=False).returncode == 0
    assert export_file.writer_factory(ExportFormat.RAW) is export_file.raw_writer


def test_a_fifo_or_a_device_is_never_written_or_opened(tmp_path: Path) -> None:
    """--output naming a FIFO (opening it would wait for a reader) or a device (/dev/null, a real disk!):
    refused before anything is opened, with or without --force; the same for the partial file's place."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for output in (fifo, Path("/dev/null")):
        for force in (False, True):
            with pytest.raises(InvalidArgument, match="not a regular file"):
                write_export(chunks(*PIECES), output, force=force)
    os.mkfifo(tmp_path / "disk.raw.partial")
    for force in (False, True):
        with pytest.raises(FailedPrecondition, match="interrupted"):
            write_export(chunks(*PIECES), tmp_path / "disk.raw", force=force)
    assert stat.S_ISFIFO((tmp_path / "disk.raw.partial").lstat().st_mode) and not (tmp_path / "disk.raw").exists()
