"""Reading one disk of a restore point out, for `vmrepl restore-points export`: its allocated ranges in
offset order as `DiskChunk` messages, then a last message that only says the disk is done.

The export is sparse: what the replica file does not allocate is not sent, nor is any run of
ZERO_GRAIN bytes inside an allocated range that reads as zeros. The receiver leaves holes there.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Iterator, Sequence
from concurrent.futures import Executor
from pathlib import Path

from target_agent import point_reads
from target_agent.point_reads import PointReads
from target_agent.points import PointDisk
from vmrepl.block import is_zero
from vmrepl.extent import Extent, KiB, MiB
from vmrepl.v1 import common_pb2

ZERO_GRAIN = 64 * KiB  # the smallest run of zeros left out of an export
# Data per message: with its few header bytes a message stays under gRPC's default 4 MiB limit (the
# controller relays it to a CLI whose channel has that limit).
CHUNK_BYTES = 4 * MiB - ZERO_GRAIN


def pieces(allocated: Sequence[Extent], size: int) -> Iterator[Extent]:
    """The allocated ranges inside the disk, cut into reads of at most CHUNK_BYTES."""
    for e in allocated:
        end = min(e.end, size)
        for lo in range(e.offset, end, CHUNK_BYTES):
            yield Extent(lo, min(CHUNK_BYTES, end - lo))


def read_piece(disk: PointDisk, buf: bytearray, piece: Extent) -> list[tuple[int, bytes]]:
    """(offset, bytes) of the runs of the piece that are not all zeros (in a pool thread)."""
    disk.read_into(memoryview(buf)[: piece.length], piece.offset)
    runs: list[tuple[int, bytes]] = []
    start = -1  # where the current run of data began, -1 outside one
    for lo in range(0, piece.length, ZERO_GRAIN):
        hi = min(lo + ZERO_GRAIN, piece.length)
        if is_zero(buf[lo:hi]):
            if start >= 0:
                runs.append((piece.offset + start, bytes(buf[start:lo])))
                start = -1
        elif start < 0:
            start = lo
    if start >= 0:
        runs.append((piece.offset + start, bytes(buf[start : piece.length])))
    return runs


async def disk_chunks(reads: PointReads) -> AsyncGenerator[common_pb2.DiskChunk, None]:
    """The disk's data in offset order, without the final done message."""
    disk = reads.disk
    allocated = await reads.extents()
    async for runs in reads.ordered(pieces(allocated, disk.size), read_piece):
        for offset, data in runs:
            yield common_pb2.DiskChunk(disk_size=disk.size, offset=offset, data=data)


async def export_disk(
    vm_dir: Path, *, point_id: str, disk_id: str, executor: Executor
) -> AsyncGenerator[common_pb2.DiskChunk, None]:
    """Disk `disk_id` of restore point `point_id`, then done (only if no session prepared it meanwhile)."""
    before = await asyncio.to_thread(point_reads.snapshot, vm_dir, disk_id)
    reads = await point_reads.open_reads(vm_dir, point_id, disk_id, executor, buffer_bytes=lambda _disk: CHUNK_BYTES)
    disk = reads.disk
    try:
        async for chunk in disk_chunks(reads):
            yield chunk
        await asyncio.to_thread(point_reads.check_unchanged, vm_dir, disk_id, before)
        yield common_pb2.DiskChunk(disk_size=disk.size, done=True)
    finally:
        reads.close()
