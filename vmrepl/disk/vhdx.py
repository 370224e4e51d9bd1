"""VHDX images (MS-VHDX), including differencing (AVHDX) chains; payload read positionally.

The format's constants, structures and validation live in `vmrepl.disk.vhdx_format` (shared with the
writer, `vmrepl.disk.vhdx_writer`); this module maps blocks to file offsets and reads them.

A Hyper-V checkpoint freezes a disk as a chain: the newest `.avhdx` whose parent locator names an older
`.avhdx` or the base `.vhdx`. Opening the newest file opens the whole chain (see docs/proxy-agent.md,
"VHDX differencing chains"):

* The parent is found by the locator's `relative_path` (from the child's directory) first, then its
  `absolute_win32_path`: through `resolve_win32` when given (the proxy's host path mappings); else as is
  on Windows, and elsewhere its drive is dropped and each of its suffixes (longest first) is tried under
  each allowed root, so a root that mirrors any folder of the Windows path finds it. `volume_path` is
  used as is on Windows only, last.
* Every parent must resolve (symlinks followed) strictly inside one of `roots` (default: the folder of
  the file opened) and is opened without following a link in its place; its DataWriteGuid must equal
  the child's `parent_linkage` (else the parent changed after the checkpoint: the chain is broken); it
  must have the child's virtual size and sector size; a file seen twice (a loop) or a chain longer than
  `max_chain` is refused.
* Per payload block of each file (MS-VHDX 2.5.1.1): FULLY_PRESENT reads this file; PARTIALLY_PRESENT
  reads each sector from this file where its bit in the chunk's sector bitmap is 1, else from the
  parent; NOT_PRESENT reads the parent (zeros at the base); ZERO, UNDEFINED and UNMAPPED read zeros and
  never the parent (the guest discarded or zeroed the block after the parent was frozen).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path, PureWindowsPath

from vmrepl.block import fill_zero
from vmrepl.disk.base import DiskReader, register_reader
from vmrepl.disk.fileio import IS_WINDOWS, PositionalFile
from vmrepl.disk.vhdx_format import (
    PAYLOAD_FULLY_PRESENT,
    PAYLOAD_NOT_PRESENT,
    PAYLOAD_PARTIALLY_PRESENT,
    Geometry,
    Layout,
    ParentLocator,
    bitmap_offsets,
    block_entries,
    read_layout,
)
from vmrepl.domain import DiskFormat
from vmrepl.errors import DiskError, PathError, UnsupportedDisk, VmreplError
from vmrepl.extent import Extent, intersect, merge
from vmrepl.names import resolve_inside

MAX_CHAIN = 64  # files in a chain; Hyper-V allows 50 checkpoints per VM
# Where a parent locator's absolute_win32_path is read here (None: nowhere); a VmreplError refuses it. Given,
# it replaces the suffix search under the roots (the proxy maps host paths through its configuration).
Win32Resolver = Callable[[str], Path | None]


class _Image:
    """One file of a chain: its layout, block states and (differencing only) sector bitmap offsets."""

    def __init__(self, file: PositionalFile) -> None:
        self.file = file
        self.layout: Layout = read_layout(file)
        self.geometry: Geometry = self.layout.geometry
        size = file.size()
        self.blocks = block_entries(self.layout, size, file.path)
        self.bitmaps = bitmap_offsets(self.layout, size, file.path)
        ratio = self.layout.chunk_ratio
        for i, (state, _off) in enumerate(self.blocks):
            if state != PAYLOAD_PARTIALLY_PRESENT:
                continue
            if not self.geometry.has_parent:
                raise UnsupportedDisk(f"{file.path}: block {i} is partially present in a disk without a parent")
            if self.bitmaps[i // ratio] < 0:
                raise DiskError(f"{file.path}: block {i} is partially present but its sector bitmap is not")

    def read_exact(self, target: memoryview, file_off: int) -> None:
        if self.file.read_into(target, file_off) != len(target):
            raise DiskError(f"{self.file.path}: short read at {file_off}")


def _win32_candidates(value: str, roots: Sequence[Path]) -> list[Path]:
    if IS_WINDOWS:
        return [Path(value)]
    parts = PureWindowsPath(re.sub(r"^\\\\\?\\", "", value)).parts
    parts = parts[1:] if parts and parts[0].endswith(("\\", ":")) else parts  # drop "C:\"
    return [root.joinpath(*parts[i:]) for i in range(len(parts)) for root in roots if parts[i:]]


def _parent_candidates(
    child: Path, locator: ParentLocator, roots: Sequence[Path], resolve_win32: Win32Resolver | None
) -> Iterator[Path]:
    """Lazily: the absolute path is resolved only when the relative one did not lead to a file."""
    entries = locator.entries
    if entries.get("relative_path"):
        yield child.parent / entries["relative_path"].replace("\\", "/")
    if value := entries.get("absolute_win32_path"):
        if resolve_win32 is None:
            yield from _win32_candidates(value, roots)
        else:
            try:
                mapped = resolve_win32(value)
            except VmreplError as e:
                raise UnsupportedDisk(f"{child}: the parent's absolute path {value!r} is refused: {e}") from e
            if mapped is not None:
                yield mapped
    if IS_WINDOWS and entries.get("volume_path"):
        yield Path(entries["volume_path"])


def _find_parent(
    child: Path, locator: ParentLocator, roots: Sequence[Path], resolve_win32: Win32Resolver | None
) -> Path:
    tried = []
    for candidate in _parent_candidates(child, locator, roots, resolve_win32):
        tried.append(candidate)
        if not os.path.lexists(candidate):
            continue
        try:
            return resolve_inside("parent", candidate, roots, what="the allowed roots")
        except PathError as e:
            raise UnsupportedDisk(f"{child}: parent {candidate} resolves outside the allowed roots") from e
    shown = ", ".join(str(p) for p in tried[:4]) or "no path in the locator"
    if resolve_win32 is not None and (value := locator.entries.get("absolute_win32_path")):
        shown += f"; its absolute path {value!r} maps to no file here"
    raise UnsupportedDisk(f"{child}: the parent of this differencing VHDX is missing (tried {shown})")


class VhdxReader(DiskReader):
    def __init__(
        self,
        path: Path,
        *,
        follow_links: bool = True,
        roots: Sequence[Path] | None = None,
        max_chain: int = MAX_CHAIN,
        resolve_win32: Win32Resolver | None = None,
    ) -> None:
        self._chain: list[_Image] = []
        self._resolve_win32 = resolve_win32
        try:
            self._open_chain(path, follow_links, roots, max_chain)
        except BaseException:
            self.close()
            raise
        self.geometry: Geometry = self._chain[0].geometry

    def _open(self, path: Path, *, follow_links: bool) -> _Image:
        f = PositionalFile(path, follow_links=follow_links)
        try:
            return _Image(f)
        except BaseException:
            f.close()
            raise

    def _open_chain(self, path: Path, follow_links: bool, roots: Sequence[Path] | None, max_chain: int) -> None:
        top = self._open(path, follow_links=follow_links)
        self._chain.append(top)
        allowed = (
            [Path(os.path.realpath(r)) for r in roots] if roots is not None else [Path(os.path.realpath(path)).parent]
        )
        st = os.fstat(top.file.fd)
        seen = {(st.st_dev, st.st_ino)}
        while (locator := self._chain[-1].layout.parent) is not None:
            child = self._chain[-1]
            if len(self._chain) >= max_chain:
                raise UnsupportedDisk(f"{path}: the differencing chain is longer than {max_chain} files")
            parent = self._open(
                _find_parent(child.file.path, locator, allowed, self._resolve_win32), follow_links=False
            )
            self._chain.append(parent)
            st = os.fstat(parent.file.fd)
            if (st.st_dev, st.st_ino) in seen:
                raise UnsupportedDisk(f"{child.file.path}: the differencing chain loops back to {parent.file.path}")
            seen.add((st.st_dev, st.st_ino))
            _check_link(child, parent, locator)

    def __enter__(self) -> VhdxReader:
        return self

    @property
    def size(self) -> int:
        return int(self.geometry.virtual_size)

    @property
    def chain(self) -> list[Path]:
        """The files read, newest first."""
        return [img.file.path for img in self._chain]

    def allocated_extents(self) -> list[Extent]:
        return self._extents(0)

    def _extents(self, level: int) -> list[Extent]:
        img = self._chain[level]
        bs = img.geometry.block_size
        own, below = [], []
        for i, (state, _off) in enumerate(img.blocks):
            extent = Extent(i * bs, min(bs, self.size - i * bs))
            if state in (PAYLOAD_FULLY_PRESENT, PAYLOAD_PARTIALLY_PRESENT):
                own.append(extent)  # a partial block's other sectors come from below, inside the same extent
            elif state == PAYLOAD_NOT_PRESENT and level + 1 < len(self._chain):
                below.append(extent)
        if below:
            own.extend(intersect(merge(below), self._extents(level + 1)))
        return merge(own)

    def read_into(self, buf: memoryview, offset: int) -> None:
        if offset < 0 or offset + len(buf) > self.size:
            raise DiskError(f"{self._chain[0].file.path}: read of {len(buf)} at {offset} is past the disk end")
        self._read(0, buf, offset)

    def _read(self, level: int, buf: memoryview, offset: int) -> None:
        img = self._chain[level]
        bs = img.geometry.block_size
        done = 0
        while done < len(buf):
            pos = offset + done
            idx, within = divmod(pos, bs)
            n = min(bs - within, len(buf) - done)
            target = buf[done : done + n]
            state, file_off = img.blocks[idx]
            if state == PAYLOAD_FULLY_PRESENT:
                img.read_exact(target, file_off + within)
            elif state == PAYLOAD_PARTIALLY_PRESENT:
                self._read_partial(level, idx, target, pos)
            elif state == PAYLOAD_NOT_PRESENT and level + 1 < len(self._chain):
                self._read(level + 1, target, pos)
            else:
                fill_zero(target)  # not present at the base; zero, undefined, unmapped anywhere
            done += n

    def _read_partial(self, level: int, idx: int, target: memoryview, pos: int) -> None:
        """Read `target` (inside block `idx`) sector by sector: this file where the bitmap says, else the parent."""
        img = self._chain[level]
        ss, bs, ratio = img.geometry.logical_sector_size, img.geometry.block_size, img.layout.chunk_ratio
        first, last = pos // ss, (pos + len(target) - 1) // ss
        chunk_first = (idx - idx % ratio) * (bs // ss)  # first sector of this chunk
        bit0 = first - chunk_first
        bitmap = bytearray((last - first + 1 + bit0 % 8 + 7) // 8)
        img.read_exact(memoryview(bitmap), img.bitmaps[idx // ratio] + bit0 // 8)
        sector = first
        while sector <= last:
            bit = sector - chunk_first - (bit0 - bit0 % 8)
            present = bitmap[bit // 8] >> (bit % 8) & 1
            run_end = sector + 1
            while run_end <= last:
                b = run_end - chunk_first - (bit0 - bit0 % 8)
                if (bitmap[b // 8] >> (b % 8) & 1) != present:
                    break
                run_end += 1
            lo, hi = max(pos, sector * ss), min(pos + len(target), run_end * ss)
            piece = target[lo - pos : hi - pos]
            if present:
                img.read_exact(piece, img.blocks[idx][1] + lo - idx * bs)
            else:
                self._read(level + 1, piece, lo)
            sector = run_end

    def close(self) -> None:
        for img in self._chain:
            img.file.close()
        self._chain = []


def _check_link(child: _Image, parent: _Image, locator: ParentLocator) -> None:
    if parent.layout.header.data_write_guid != locator.linkage:
        raise UnsupportedDisk(
            f"{child.file.path}: parent {parent.file.path} has DataWriteGuid {parent.layout.header.data_write_guid}, "
            f"not the parent_linkage {locator.linkage} the child recorded: the parent changed, the chain is broken"
        )
    cg, pg = child.geometry, parent.geometry
    if (cg.virtual_size, cg.logical_sector_size) != (pg.virtual_size, pg.logical_sector_size):
        raise UnsupportedDisk(f"{child.file.path}: parent {parent.file.path} has another virtual size or sector size")


register_reader(DiskFormat.VHDX, VhdxReader)
