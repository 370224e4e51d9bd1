"""Verifying a replica at a restore point: each block (or a random sample) re-read from the point's disk,
hashed with xxh3-128 as the stream's digests are (vmrepl.block.digest), and compared with the point's
digest of that block.

A block whose digest is unknown (all zero: written before a crash and never re-sent) cannot be vouched
for: it is counted, not called a mismatch. A block in a hole of the replica file reads as zeros, so its
digest is the zero block's without reading it. Mismatches are reported by byte range, one per block, in
`VerifyProgress` messages every PROGRESS_SECONDS and when a disk is done.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import random
import time
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

from target_agent import point_reads
from target_agent.point_reads import PointReads
from target_agent.points import PointDisk, find_point
from vmrepl.block import DIGEST_SIZE, UNKNOWN_DIGEST, digest, zero_digest
from vmrepl.errors import InvalidArgument, NotFound
from vmrepl.extent import Extent, MiB
from vmrepl.names import check_name
from vmrepl.v1 import common_pb2

READ_BYTES = 4 * MiB  # one read covers as many whole blocks as fit in this (at least one block)
PROGRESS_SECONDS = 2.0
# A disk with many mismatches sends them in messages of at most this many ranges (a message stays small).
MAX_RANGES_PER_MESSAGE = 4096
MAX_DISKS = 256  # disk ids one request may name


@dataclass(frozen=True, slots=True)
class Piece:
    """Blocks [first, first + count) read at once; `wanted` the ones checked (None: all of them)."""

    first: int
    count: int
    wanted: tuple[int, ...] | None = None


@dataclass(frozen=True, slots=True)
class Checked:
    blocks: int
    unknown: int
    mismatched: tuple[int, ...]  # block indexes


class Holes:
    """Whether a byte range of the replica holds any allocated byte (the rest reads as zeros)."""

    def __init__(self, allocated: Sequence[Extent]) -> None:
        self._extents = list(allocated)
        self._ends = [e.end for e in self._extents]

    def allocated(self, lo: int, hi: int) -> bool:
        i = bisect.bisect_right(self._ends, lo)
        return i < len(self._extents) and self._extents[i].offset < hi


def check_disk_ids(name: str, disk_ids: Sequence[str]) -> list[str]:
    if len(disk_ids) > MAX_DISKS:
        raise InvalidArgument(name, f"names {len(disk_ids)} disks; at most {MAX_DISKS}")
    for d in disk_ids:
        check_name(name, d)
    if len(set(disk_ids)) != len(disk_ids):
        raise InvalidArgument(name, "names a disk twice")
    return list(disk_ids)


def sample_size(blocks: int, percent: int) -> int:
    """Blocks a `percent` sample checks: the share rounded up, at least one of a disk that has any."""
    return min(blocks, max(1, -(-blocks * percent // 100))) if blocks else 0


def selection(blocks: int, k: int, rng: random.Random) -> Iterator[int]:
    """`k` of `blocks` block indexes chosen uniformly at random, in increasing order, without holding them
    all (selection sampling, Knuth's algorithm S): a sample of a disk of millions of blocks costs no memory."""
    needed = k
    for b in range(blocks):
        if needed == 0:
            return
        if rng.random() * (blocks - b) < needed:
            needed -= 1
            yield b


def pieces(blocks: int, per_read: int, chosen: Iterator[int] | None) -> Iterator[Piece]:
    """The reads of a check: every block in runs of `per_read`, or per run of `per_read` the span from the
    first to the last chosen block in it."""
    if chosen is None:
        for first in range(0, blocks, per_read):
            yield Piece(first, min(per_read, blocks - first))
        return
    for _, group in itertools.groupby(chosen, key=lambda b: b // per_read):
        wanted = tuple(group)
        yield Piece(wanted[0], wanted[-1] - wanted[0] + 1, wanted)


def check_piece(disk: PointDisk, buf: bytearray, piece: Piece, holes: Holes) -> Checked:
    """Read one piece into `buf` (in a pool thread) and compare its wanted blocks with their digests."""
    bs = disk.block_size
    start, end = piece.first * bs, min(disk.size, (piece.first + piece.count) * bs)
    expected = disk.digests(piece.first, piece.count)
    view = memoryview(buf)[: end - start]
    has_data = holes.allocated(start, end)
    if has_data:
        disk.read_into(view, start)
    unknown, bad = 0, []
    for b in piece.wanted if piece.wanted is not None else range(piece.first, piece.first + piece.count):
        i = b - piece.first
        want = expected[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE]
        if want == UNKNOWN_DIGEST:
            unknown += 1
            continue
        lo, hi = i * bs, min((i + 1) * bs, end - start)
        if (digest(view[lo:hi]) if has_data else zero_digest(hi - lo)) != want:
            bad.append(b)
    return Checked(len(piece.wanted) if piece.wanted is not None else piece.count, unknown, tuple(bad))


@dataclass(kw_only=True)
class Tally:
    """One disk's figures so far, and the mismatches not yet reported."""

    disk_id: str
    disk_size: int
    block_size: int
    total: int
    checked: int = 0
    unknown: int = 0
    count: int = 0
    unsent: list[int] = field(default_factory=list)

    def add(self, c: Checked) -> None:
        self.checked += c.blocks
        self.unknown += c.unknown
        self.count += len(c.mismatched)
        self.unsent.extend(c.mismatched)

    def message(self, *, done: bool = False) -> common_pb2.VerifyProgress:
        """The figures and up to MAX_RANGES_PER_MESSAGE unsent mismatches (done only with none left)."""
        sent, self.unsent = self.unsent[:MAX_RANGES_PER_MESSAGE], self.unsent[MAX_RANGES_PER_MESSAGE:]
        bs = self.block_size
        return common_pb2.VerifyProgress(
            disk_id=self.disk_id,
            blocks_total=self.total,
            blocks_checked=self.checked,
            blocks_unknown=self.unknown,
            mismatches=[common_pb2.ByteRange(offset=b * bs, length=min(bs, self.disk_size - b * bs)) for b in sent],
            done=done and not self.unsent,
            mismatch_count=self.count,
            block_size=bs,
        )


async def verify_disk(
    reads: PointReads,
    *,
    disk_id: str,
    percent: int,
    rng: random.Random,
    every: float = PROGRESS_SECONDS,
    clock: Callable[[], float] = time.monotonic,
) -> AsyncGenerator[common_pb2.VerifyProgress, None]:
    """Check one open disk; progress every `every` seconds, the last message done=True."""
    disk = reads.disk
    holes = Holes(await reads.extents())
    per_read = max(1, READ_BYTES // disk.block_size)
    k = sample_size(disk.blocks, percent)
    chosen = None if k == disk.blocks else selection(disk.blocks, k, rng)
    tally = Tally(disk_id=disk_id, disk_size=disk.size, block_size=disk.block_size, total=k)
    last = clock()
    async for checked in reads.ordered(
        pieces(disk.blocks, per_read, chosen), lambda d, b, p: check_piece(d, b, p, holes)
    ):
        tally.add(checked)
        if len(tally.unsent) >= MAX_RANGES_PER_MESSAGE or clock() - last >= every:
            yield tally.message()
            last = clock()
    while True:
        msg = tally.message(done=True)
        yield msg
        if msg.done:
            return


def _read_bytes(disk: PointDisk) -> int:
    return max(1, READ_BYTES // disk.block_size) * disk.block_size


async def verify_point(
    vm_dir: Path,
    *,
    point_id: str,
    disk_ids: list[str],
    percent: int,
    executor: Executor,
    rng: random.Random,
    every: float = PROGRESS_SECONDS,
) -> AsyncGenerator[common_pb2.VerifyProgress, None]:
    """Check the disks `disk_ids` (empty: all) of restore point `point_id` ("" the newest), one after another."""
    point = await asyncio.to_thread(find_point, vm_dir, point_id)  # "" resolved once, for every disk
    held = [d.disk_id for d in point.disks]
    missing = [d for d in disk_ids if d not in held]
    if missing:  # before any disk is read, not after the others were
        raise NotFound(f"restore point {point.id} has no disk {', '.join(missing)}")
    for disk_id in disk_ids or held:
        before = await asyncio.to_thread(point_reads.snapshot, vm_dir, disk_id)
        reads = await point_reads.open_reads(vm_dir, point.id, disk_id, executor, buffer_bytes=_read_bytes)
        try:
            messages = verify_disk(reads, disk_id=disk_id, percent=percent, rng=rng, every=every)
            async with contextlib.aclosing(messages):
                async for msg in messages:
                    if msg.done:  # a disk a session prepared meanwhile gets no verdict (see point_reads)
                        await asyncio.to_thread(point_reads.check_unchanged, vm_dir, disk_id, before)
                    yield msg
        finally:
            reads.close()
