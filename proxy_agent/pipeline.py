"""Turning planned batches into frames: read, zero check, digest, compress, frame.

One planned batch is built entirely in one worker thread (positional reads,
xxhash and lz4 release the GIL), and several batches are built at once,
`depth` ahead of the sender, in order. Each thread reuses one block buffer;
a frame is joined once and let go as soon as it is sent.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass

from protos.vmrepl.v1 import target_pb2
from proxy_agent.plan import PlannedBatch
from vmrepl.batch import DATA, LZ4, RAW, ZERO, encode_batch
from vmrepl.block import Compression, compress, digest, is_zero
from vmrepl.disk.base import DiskReader


@dataclass(slots=True)
class BuiltBatch:
    seq: int
    start: int
    end: int
    final: bool
    frame: bytes
    read_bytes: int = 0
    data_bytes: int = 0
    zero_bytes: int = 0
    read_seconds: float = 0.0
    compress_seconds: float = 0.0


class BatchBuilder:
    def __init__(self, reader: DiskReader, *, block_size: int, compression: Compression) -> None:
        self._reader = reader
        self._block_size = block_size
        self._compression = compression
        self._local = threading.local()

    def _buffer(self, length: int) -> bytearray:
        # Full blocks reuse the thread's buffer; the disk's short last block gets its own.
        if length != self._block_size:
            return bytearray(length)
        buf: bytearray | None = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = bytearray(self._block_size)
        return buf

    def build(self, planned: PlannedBatch, seq: int) -> BuiltBatch:
        out = BuiltBatch(seq=seq, start=planned.start, end=planned.end, final=planned.final, frame=b"")
        extents: list[target_pb2.Extent] = []
        parts: list[bytes] = []

        def add_zero(offset: int, length: int) -> None:
            last = extents[-1] if extents else None
            if last is not None and last.kind == ZERO and last.offset + last.length == offset:
                last.length += length
            else:
                extents.append(target_pb2.Extent(offset=offset, length=length, kind=ZERO))

        for item in planned.items:
            if not item.read:
                add_zero(item.offset, item.length)
                continue
            buf = self._buffer(item.length)
            t0 = time.perf_counter()
            self._reader.read_into(memoryview(buf), item.offset)
            t1 = time.perf_counter()
            out.read_seconds += t1 - t0
            out.read_bytes += item.length
            if is_zero(buf):
                out.zero_bytes += item.length
                add_zero(item.offset, item.length)
            else:
                packed = compress(buf, self._compression)
                stored = packed if packed is not None else bytes(buf)
                extents.append(
                    target_pb2.Extent(
                        offset=item.offset,
                        length=item.length,
                        kind=DATA,
                        encoding=LZ4 if packed is not None else RAW,
                        stored_size=len(stored),
                        digest=digest(buf),
                    )
                )
                parts.append(stored)
                out.data_bytes += item.length
            out.compress_seconds += time.perf_counter() - t1
        header = target_pb2.BatchHeader(
            seq=seq,
            start_offset=planned.start,
            end_offset=planned.end,
            extents=extents,
            payload_size=sum(len(p) for p in parts),
            final=planned.final,
        )
        out.frame = encode_batch(header, parts)
        return out


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
