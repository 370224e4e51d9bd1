"""Turning planned batches into frames: read, zero check, digest, compare, compress, frame.

One planned batch is built entirely in one worker thread (positional reads,
xxhash and lz4 release the GIL), and several batches are built at once,
`depth` ahead of the sender, in order. Each thread reuses one block buffer;
a frame is joined once and let go as soon as it is sent.

With the replica's digest table (digest-comparison incrementals), a block
whose digest equals the replica's is not sent; unknown digests (all zero
bytes) never match.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field

from proxy_agent.plan import PlannedBatch
from vmrepl.batch import BatchEncoder, PassDigest
from vmrepl.block import DIGEST_SIZE, digest, is_zero, zero_digest
from vmrepl.disk.base import DiskReader
from vmrepl.domain import Compression
from vmrepl.extent import Extent, split_blocks


@dataclass(slots=True)
class BuiltBatch:
    seq: int
    start: int
    end: int
    final: bool
    frame: bytes
    # The pass digest of this batch's extents (see vmrepl.batch.PassDigest).
    digest: PassDigest = field(default_factory=PassDigest)
    read_bytes: int = 0
    data_bytes: int = 0
    zero_bytes: int = 0
    unchanged_bytes: int = 0
    read_seconds: float = 0.0
    compress_seconds: float = 0.0
    # In a digest comparison: the blocks sent because they differ from the replica (proxy_agent/full_check.py).
    differed: list[Extent] = field(default_factory=list)


class BatchBuilder:
    def __init__(
        self,
        reader: DiskReader,
        *,
        block_size: int,
        compression: Compression,
        replica_digests: bytes | None = None,
        read_delay: float = 0.0,
    ) -> None:
        self._reader = reader
        self._read_delay = read_delay
        self._block_size = block_size
        self._compression = compression
        self._replica = replica_digests
        self._local = threading.local()

    def _buffer(self, length: int) -> bytearray:
        # Full blocks reuse the thread's buffer; the disk's short last block gets its own.
        if length != self._block_size:
            return bytearray(length)
        buf: bytearray | None = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = bytearray(self._block_size)
        return buf

    def replica_has(self, offset: int, block_digest: bytes) -> bool:
        if self._replica is None:
            return False
        at = offset // self._block_size * DIGEST_SIZE
        return self._replica[at : at + DIGEST_SIZE] == block_digest

    def _differed(self, out: BuiltBatch, offset: int, length: int) -> None:
        if self._replica is not None:  # without a replica table every block is sent, none "differs"
            out.differed.append(Extent(offset, length))

    def build(self, planned: PlannedBatch, seq: int) -> BuiltBatch:
        out = BuiltBatch(seq=seq, start=planned.start, end=planned.end, final=planned.final, frame=b"")
        enc = BatchEncoder(
            seq=seq, start=planned.start, end=planned.end, final=planned.final, compression=self._compression
        )
        for item in planned.items:
            if item.read:
                self._read_block(item.offset, item.length, out, enc)
            elif self._replica is None:
                enc.add_zero(item.offset, item.length)
            else:
                # Unallocated at the source (counted as such): zero it only where the replica is not zero.
                for b in split_blocks([Extent(item.offset, item.length)], self._block_size):
                    if not self.replica_has(b.offset, zero_digest(b.length)):
                        enc.add_zero(b.offset, b.length)
                        out.differed.append(b)
        encoded = enc.finish()
        out.frame, out.digest = encoded.frame, encoded.digest
        return out

    def _read_block(self, offset: int, length: int, out: BuiltBatch, enc: BatchEncoder) -> None:
        buf = self._buffer(length)
        t0 = time.perf_counter()
        self._reader.read_into(memoryview(buf), offset)
        if self._read_delay:
            time.sleep(self._read_delay)
        t1 = time.perf_counter()
        out.read_seconds += t1 - t0
        out.read_bytes += length
        if is_zero(buf):
            out.zero_bytes += length
            if not self.replica_has(offset, zero_digest(length)):
                enc.add_zero(offset, length)
                self._differed(out, offset, length)
        else:
            d = digest(buf)
            if self.replica_has(offset, d):
                out.unchanged_bytes += length
            else:
                enc.add_data(offset, buf, d)
                out.data_bytes += length
                self._differed(out, offset, length)
        out.compress_seconds += time.perf_counter() - t1


async def built_batches(
    builder: BatchBuilder, planned: Iterator[PlannedBatch], *, executor: Executor, depth: int
) -> AsyncGenerator[BuiltBatch, None]:
    """Build batches `depth` ahead in the executor and yield them in order."""
    loop = asyncio.get_running_loop()
    inflight: deque[asyncio.Future[BuiltBatch]] = deque()
    seq = 0
    try:
        for pb in planned:
            inflight.append(loop.run_in_executor(executor, builder.build, pb, seq))
            seq += 1
            if len(inflight) >= depth:
                yield await inflight.popleft()
        while inflight:
            yield await inflight.popleft()
    finally:
        for fut in inflight:
            fut.cancel()
