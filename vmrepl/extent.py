"""Extent maths: pure functions over sorted, non-overlapping byte ranges.

An extent list is *normal* when sorted by offset, every length is positive,
and no two extents overlap or touch. Every function here takes normal lists
(or makes them with `merge`) and returns normal lists.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

KiB = 1024
MiB = 1024 * KiB


@dataclass(frozen=True, slots=True)
class Extent:
    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length

    def __post_init__(self) -> None:
        if self.offset < 0 or self.length <= 0:
            raise ValueError(f"invalid extent offset={self.offset} length={self.length}")


def merge(extents: Iterable[Extent]) -> list[Extent]:
    """Sort and coalesce overlapping or touching extents."""
    out: list[Extent] = []
    for e in sorted(extents, key=lambda x: x.offset):
        if out and e.offset <= out[-1].end:
            last = out[-1]
            if e.end > last.end:
                out[-1] = Extent(last.offset, e.end - last.offset)
        else:
            out.append(e)
    return out


def intersect(a: list[Extent], b: list[Extent]) -> list[Extent]:
    """Bytes in both normal lists."""
    out: list[Extent] = []
    i = j = 0
    while i < len(a) and j < len(b):
        lo = max(a[i].offset, b[j].offset)
        hi = min(a[i].end, b[j].end)
        if lo < hi:
            out.append(Extent(lo, hi - lo))
        if a[i].end <= b[j].end:
            i += 1
        else:
            j += 1
    return merge(out)


def subtract(a: list[Extent], b: list[Extent]) -> list[Extent]:
    """Bytes of normal list `a` not in normal list `b`."""
    out: list[Extent] = []
    j = 0
    for e in a:
        start = e.offset
        while j < len(b) and b[j].end <= start:
            j += 1
        k = j
        while k < len(b) and b[k].offset < e.end:
            if b[k].offset > start:
                out.append(Extent(start, b[k].offset - start))
            start = max(start, b[k].end)
            k += 1
        if start < e.end:
            out.append(Extent(start, e.end - start))
    return out


def clip(extents: list[Extent], start: int, end: int) -> list[Extent]:
    """The part of a normal list inside [start, end)."""
    if start >= end:
        return []
    return intersect(extents, [Extent(start, end - start)])


def complement(extents: list[Extent], start: int, end: int) -> list[Extent]:
    """Bytes of [start, end) not in the normal list."""
    if start >= end:
        return []
    return subtract([Extent(start, end - start)], extents)


def align_out(extents: list[Extent], block_size: int, disk_size: int) -> list[Extent]:
    """Grow each extent to whole blocks (the last block may be short), then merge."""
    grown = []
    for e in extents:
        lo = e.offset - e.offset % block_size
        hi = min(-(-e.end // block_size) * block_size, disk_size)
        if lo < hi:
            grown.append(Extent(lo, hi - lo))
    return merge(grown)


def align_in(extents: list[Extent], block_size: int, disk_size: int) -> list[Extent]:
    """Shrink each extent to the whole blocks inside it (the disk's short last block counts as whole)."""
    out = []
    for e in merge(extents):
        lo = -(-e.offset // block_size) * block_size
        hi = e.end if e.end == disk_size else e.end - e.end % block_size
        if lo < hi:
            out.append(Extent(lo, hi - lo))
    return out


def split_blocks(extents: Iterable[Extent], block_size: int) -> Iterator[Extent]:
    """Cut extents at block boundaries: every piece lies inside one block."""
    for e in extents:
        pos = e.offset
        while pos < e.end:
            nxt = min((pos // block_size + 1) * block_size, e.end)
            yield Extent(pos, nxt - pos)
            pos = nxt


def total(extents: Iterable[Extent]) -> int:
    return sum(e.length for e in extents)
