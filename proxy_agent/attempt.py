"""One Transfer stream of one pass: open, send batches within the window, read the acks.

An attempt opens the stream, learns the offset to resume from and the target's pass digest below it,
plans batches from there and sends them with at most `window` batches unacknowledged. It ends when the
target acknowledged the final batch (True), when a stop was asked for and the target committed what it
had (False), or with StreamBroken / an error the transfer's orchestrator decides about.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import grpc

from proxy_agent import stats as st
from proxy_agent.pass_digest import PassDigestTracker
from proxy_agent.pipeline import BatchBuilder, BuiltBatch, built_batches
from proxy_agent.plan import Plan, plan_batches
from proxy_agent.target_link import TransferCall, broken, refused
from proxy_agent.throttle import TokenBucket
from vmrepl.batch import MAX_EXTENTS, PROTOCOL_VERSIONS, PassDigest, check_chosen_version, encode_open
from vmrepl.errors import TransferError
from vmrepl.logs import get_logger
from vmrepl.v1 import target_pb2

log = get_logger("vmrepl.proxy.transfer")
ACCEPT_TIMEOUT = 30.0


@dataclass(slots=True)
class PassRun:
    """What one pass over the disk sends, and its digest."""

    number: int
    plan: Plan
    builder: BatchBuilder
    digest: PassDigestTracker


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamSettings:
    batch_bytes: int
    window: int
    threads: int


class StreamAttempt:
    def __init__(
        self,
        call: TransferCall,
        *,
        opening: target_pb2.TransferOpen,
        settings: StreamSettings,
        stats: st.TransferStats,
        stopping: asyncio.Event,
        on_progress: Callable[[], None],
        bucket: TokenBucket | None,
    ) -> None:
        self._call = call
        self._open_msg = opening
        self._settings = settings
        self._stats = stats
        self._stopping = stopping
        self._on_progress = on_progress
        self._bucket = bucket

    async def run(self, executor: Executor, p: PassRun) -> bool:
        """True when the pass completed, False when it stopped on request."""
        call = self._call
        try:
            resume = await self._open(p)
            self._stats.state = st.RUNNING
            window = asyncio.Semaphore(self._settings.window)
            sender = asyncio.create_task(self._send(executor, p, resume, window))
            acks = asyncio.create_task(self._read_acks(p, window))
            return await _first_result(sender, acks)
        finally:
            if not call.done():
                call.cancel()

    async def _open(self, p: PassRun) -> int:
        opening = target_pb2.TransferOpen()
        opening.CopyFrom(self._open_msg)
        opening.pass_number = p.number
        opening.protocol_versions[:] = PROTOCOL_VERSIONS
        await self._call.write(encode_open(opening))
        msg = await asyncio.wait_for(self._call.read(), ACCEPT_TIMEOUT)
        if msg is None:
            raise await broken(self._call)
        if msg.HasField("error"):
            raise refused(msg.error)
        if not msg.HasField("accept"):
            raise TransferError("the target's first answer is not an accept")
        check_chosen_version(msg.accept.protocol_version)
        resume = int(msg.accept.resume_offset)
        size, bs = opening.disk_size, opening.block_size
        if resume > size or (resume % bs and resume != size):
            raise TransferError(f"the target asks to resume at {resume}, not a block boundary of this disk")
        p.digest.resume(resume, PassDigest.from_wire(msg.accept.session_digest, field="accept.session_digest"))
        self._stats.committed_offset = resume
        log.info("stream_accepted", resume_offset=resume, pass_number=p.number)
        return resume

    async def _send(self, executor: Executor, p: PassRun, resume: int, window: asyncio.Semaphore) -> None:
        s = self._settings
        planned = plan_batches(p.plan, start=resume, batch_bytes=s.batch_bytes, max_items=MAX_EXTENTS)
        batches = built_batches(p.builder, planned, executor=executor, depth=s.threads + 1)
        try:
            async for b in batches:
                if self._stopping.is_set():
                    break
                t0 = time.perf_counter()
                await window.acquire()
                if self._bucket is not None:
                    await self._bucket.consume(len(b.frame))
                await self._call.write(b.frame)
                self._stats.network_wait += time.perf_counter() - t0
                p.digest.sent(b.end, b.digest)
                self._count(b)
                if b.final:
                    break
        finally:
            await batches.aclose()
        await self._call.done_writing()

    def _count(self, b: BuiltBatch) -> None:
        s = self._stats
        s.bytes_sent += len(b.frame)
        s.bytes_read += b.read_bytes
        s.bytes_data += b.data_bytes
        s.source_read += b.read_seconds
        s.compress += b.compress_seconds
        s.zero += b.zero_bytes
        s.unchanged += b.unchanged_bytes
        if s.full_check is not None:
            s.full_check.record(b.differed)

    async def _read_acks(self, p: PassRun, window: asyncio.Semaphore) -> bool:
        last_seq = -1
        while True:
            msg = await self._call.read()
            if msg is None:
                code, _ = await self._call.status()
                if code == grpc.StatusCode.OK and self._stopping.is_set():
                    return False
                raise await broken(self._call)
            if msg.HasField("error"):
                raise refused(msg.error)
            if not msg.HasField("ack"):
                raise TransferError("the target sent something other than an ack")
            ack = msg.ack
            if ack.seq <= last_seq and last_seq >= 0:
                raise TransferError(f"the target acknowledged batch {ack.seq} after {last_seq}")
            for _ in range(ack.seq - last_seq):
                window.release()
            last_seq = ack.seq
            if ack.committed_offset > self._stats.committed_offset:
                self._on_progress()
            self._stats.committed_offset = ack.committed_offset
            self._stats.target_write_stream = ack.write_busy_seconds
            p.digest.committed(ack.committed_offset)
            if ack.complete:
                p.digest.check_end(PassDigest.from_wire(ack.session_digest, field="ack.session_digest"))
                return True


async def _first_result(sender: asyncio.Task[None], acks: asyncio.Task[bool]) -> bool:
    """Wait for the ack reader's verdict; a failing sender fails the attempt at once."""
    try:
        done, _ = await asyncio.wait({sender, acks}, return_when=asyncio.FIRST_EXCEPTION)
        for t in done:
            exc = t.exception()
            if exc is not None:
                raise exc
        result = await acks
        await sender
        return result
    finally:
        for t in (sender, acks):
            if not t.done():
                t.cancel()
        await asyncio.gather(sender, acks, return_exceptions=True)
