"""One disk transfer: stream batches to the target, resume after breaks, verify, stop cleanly.

A transfer makes one pass over the disk, or two: after a changed-range pass,
a sample of the blocks it did not send is checked against the replica's
digests, and a mismatch re-runs the disk as a full digest comparison.

An attempt opens the Transfer stream, learns the offset to resume from,
plans batches from there and sends them with at most `window` batches
unacknowledged. A break the stream can recover from (target restarted,
network cut) starts another attempt after a backoff; the proxy gives up only
after `resume_timeout` seconds without progress. Both ends keep a session
digest over every extent of the pass and compare it at the end of the disk.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import structlog
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_exponential_jitter

from proxy_agent import stats as st
from proxy_agent.pipeline import BatchBuilder, BuiltBatch, built_batches
from proxy_agent.plan import Plan, plan_batches
from proxy_agent.throttle import TokenBucket
from proxy_agent.verify import choose_sample, unsent_blocks
from vmrepl.batch import MAX_EXTENTS, MAX_PASS, encode_open
from vmrepl.block import DIGEST_SIZE, UNKNOWN_DIGEST, digest, is_zero, zero_digest
from vmrepl.disk.base import DiskReader
from vmrepl.domain import ChangeMode, Compression, retryable
from vmrepl.errors import ChecksumMismatch, TransferError, VmreplError
from vmrepl.extent import Extent
from vmrepl.logs import get_logger
from vmrepl.progress import Sample
from vmrepl.v1 import proxy_pb2, target_pb2

log = get_logger("vmrepl.proxy.transfer")
TRANSFER_METHOD = "/vmrepl.v1.TargetAgent/Transfer"
READ_DIGESTS_METHOD = "/vmrepl.v1.TargetAgent/ReadDigests"
ACCEPT_TIMEOUT = 30.0
_MOD = 1 << 128


class StreamBroken(Exception):
    """The Transfer stream ended before the transfer did."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, StreamBroken):
        return retryable(exc.code)
    if isinstance(exc, grpc.aio.AioRpcError):
        return retryable(exc.code())
    return isinstance(exc, (TimeoutError, ConnectionError))


@dataclass(frozen=True, slots=True, kw_only=True)
class TransferSpec:
    transfer_id: str
    session_id: str
    checkpoint_id: str
    disk_id: str
    replica_path: str
    ticket: bytes
    block_size: int
    mode: ChangeMode
    compression: Compression
    bandwidth_bytes_per_s: float
    resume_timeout: float
    batch_bytes: int
    window: int
    threads: int
    read_delay: float = 0.0  # test only: seconds added to each block read (to make the source the bottleneck)


class _Progress:
    """tenacity stop condition: give up after `timeout` seconds without the committed offset moving."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.stamp = time.monotonic()

    def touch(self) -> None:
        self.stamp = time.monotonic()

    def __call__(self, state: RetryCallState) -> bool:
        return time.monotonic() - self.stamp > self.timeout


@dataclass(slots=True)
class _Pass:
    """What one pass over the disk sends, and its session digest at each batch end not yet acknowledged."""

    number: int
    plan: Plan
    builder: BatchBuilder
    digest: int = 0
    snapshots: dict[int, int] | None = None


class DiskTransfer:
    def __init__(
        self,
        *,
        spec: TransferSpec,
        plan: Plan,
        full_plan: Callable[[], Plan],
        reader: DiskReader,
        channel_factory: Callable[[], Any],
    ) -> None:
        self.spec = spec
        self.plan = plan
        self._full_plan = full_plan
        self.stats = st.TransferStats(spec.transfer_id, spec.session_id, spec.disk_id, plan.disk_size)
        self.stats.threads = spec.threads
        self._reader = reader
        self._channel_factory = channel_factory
        self._stopping = asyncio.Event()
        self._progress = _Progress(spec.resume_timeout)
        rate = spec.bandwidth_bytes_per_s
        # A small burst (0.1 s) keeps the rate exact; tokens may go negative, so any frame size passes.
        self._bucket = TokenBucket(rate=rate, burst=rate / 10) if rate > 0 else None
        self.task: asyncio.Task[None] | None = None
        # Set when the transfer ends, so watchers report the end at once rather than at their next poll.
        self.ended = asyncio.Event()

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"transfer-{self.spec.transfer_id}")

    def stop(self) -> None:
        """Ask for a clean stop: no new batches, the target commits what it has."""
        self._stopping.set()

    async def _run(self) -> None:
        with structlog.contextvars.bound_contextvars(
            session_id=self.spec.session_id, disk_id=self.spec.disk_id, transfer_id=self.spec.transfer_id
        ):
            executor = ThreadPoolExecutor(self.spec.threads, thread_name_prefix="vmrepl-batch")
            channel = self._channel_factory()
            try:
                done = await self._passes(executor, channel)
                if done:
                    self._finish(st.COMPLETED)
                else:
                    self._finish(st.CANCELLED, "CANCELLED", "stopped; resumable from the committed offset")
            except asyncio.CancelledError:
                self._finish(st.CANCELLED, "CANCELLED", "cancelled")
                raise
            except Exception as e:  # every failure ends as a state the controller can read
                self._fail(e)
            finally:
                await channel.close()
                await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)
                await asyncio.to_thread(self._reader.close)

    async def _passes(self, executor: ThreadPoolExecutor, channel: Any) -> bool:
        done = await self._pass(executor, channel, 0, self.plan, compare=self.spec.mode is ChangeMode.COMPARE)
        if not done or self.spec.mode is not ChangeMode.RANGES:
            return done
        mismatched, sampled = await self._verify_sample(executor, channel)
        self.stats.sampled_blocks, self.stats.mismatched_blocks = sampled, mismatched
        if not mismatched:
            log.info("sampled_verification_passed", sampled=sampled)
            return True
        # The change tracking lost writes: the disk is re-run as a full digest comparison (pass 2).
        log.warning("sampled_verification_failed", mismatched=mismatched, sampled=sampled)
        return await self._pass(executor, channel, MAX_PASS, self._full_plan(), compare=True)

    def _retrying(self) -> AsyncRetrying:
        return AsyncRetrying(
            retry=retry_if_exception(_transient),
            wait=wait_exponential_jitter(initial=0.2, max=10),
            stop=self._progress,
            before_sleep=self._before_retry,
            reraise=True,
        )

    async def _pass(
        self, executor: ThreadPoolExecutor, channel: Any, number: int, plan: Plan, *, compare: bool
    ) -> bool:
        s = self.stats
        s.passes = number + 1
        s.unallocated, s.excluded, s.unchanged = plan.unallocated, plan.excluded, plan.unchanged
        table = None
        if compare:
            async for attempt in self._retrying():
                with attempt:
                    table = await self._read_digests(channel)
        builder = BatchBuilder(
            self._reader,
            block_size=self.spec.block_size,
            compression=self.spec.compression,
            replica_digests=table,
            read_delay=self.spec.read_delay,
        )
        p = _Pass(number, plan, builder)
        async for attempt in self._retrying():
            with attempt:
                done = await self._attempt(executor, channel, p)
        return done

    async def _read_digests(self, channel: Any, first: int = 0, count: int = 0) -> bytes:
        call = channel.unary_stream(
            READ_DIGESTS_METHOD,
            request_serializer=target_pb2.ReadDigestsRequest.SerializeToString,
            response_deserializer=target_pb2.DigestChunk.FromString,
        )
        req = target_pb2.ReadDigestsRequest(
            replica_path=self.spec.replica_path,
            disk_id=self.spec.disk_id,
            session_id=self.spec.session_id,
            ticket=self.spec.ticket,
            first_block=first,
            block_count=count,
        )
        parts = []
        async for chunk in call(req):
            if chunk.block_size != self.spec.block_size:
                # The replica keeps digests at another block size: none of them can vouch for a block here.
                return UNKNOWN_DIGEST * (count or -(-self.plan.disk_size // self.spec.block_size))
            parts.append(chunk.digests)
        return b"".join(parts)

    async def _verify_sample(self, executor: ThreadPoolExecutor, channel: Any) -> tuple[int, int]:
        """(mismatched, sampled) over a sample of the blocks the changed-range pass did not send."""
        bs, size = self.spec.block_size, self.plan.disk_size
        candidates = list(unsent_blocks(self.plan.read + self.plan.zero, disk_size=size, block_size=bs))
        sample = choose_sample(candidates, disk_blocks=-(-size // bs), seed=self.spec.transfer_id)
        if not sample:
            return 0, 0
        table = await self._read_digests(channel)
        loop = asyncio.get_running_loop()
        mine = await loop.run_in_executor(executor, self._hash_blocks, sample)
        self.stats.bytes_read += sum(b.length for b in sample)  # counters change on the event loop only
        mismatched = 0
        for block, d in zip(sample, mine, strict=True):
            at = block.offset // bs * DIGEST_SIZE
            if table[at : at + DIGEST_SIZE] != d:
                mismatched += 1
        return mismatched, len(sample)

    def _hash_blocks(self, blocks: list[Extent]) -> list[bytes]:
        out = []
        for b in blocks:
            buf = bytearray(b.length)
            self._reader.read_into(memoryview(buf), b.offset)
            out.append(zero_digest(b.length) if is_zero(buf) else digest(buf))
        return out

    def _before_retry(self, state: RetryCallState) -> None:
        self.stats.state = st.RECONNECTING
        self.stats.resumes += 1
        exc = state.outcome.exception() if state.outcome else None
        log.warning(
            "stream_broken", error=str(exc), committed_offset=self.stats.committed_offset, attempt=state.attempt_number
        )

    def _finish(self, state: proxy_pb2.TransferState.ValueType, code: str = "", message: str = "") -> None:
        s = self.stats
        s.state, s.error_code, s.error_message = state, code, message
        s.ended = time.monotonic()
        self.ended.set()
        log.info(
            "transfer_ended",
            state=proxy_pb2.TransferState.Name(state),
            error=message or None,
            bytes_sent=s.bytes_sent,
            bytes_data=s.bytes_data,
            resumes=s.resumes,
            passes=s.passes,
            verification=Sample(sampled_blocks=s.sampled_blocks, mismatched_blocks=s.mismatched_blocks).words(s.passes)
            or None,
            elapsed=round(s.ended - s.started, 3),
        )

    def _fail(self, e: Exception) -> None:
        if isinstance(e, StreamBroken):
            self._finish(st.FAILED, e.code.name, e.details)
        elif isinstance(e, grpc.aio.AioRpcError):
            self._finish(st.FAILED, e.code().name, e.details() or "")
        elif isinstance(e, VmreplError):
            self._finish(st.FAILED, e.grpc_code, str(e))
        else:
            log.exception("transfer_internal_error")
            self._finish(st.FAILED, "INTERNAL", f"{type(e).__name__}: {e}")

    async def _attempt(self, executor: ThreadPoolExecutor, channel: Any, p: _Pass) -> bool:
        """One stream. True when the pass completed, False when it stopped on request."""
        if self._stopping.is_set():
            return False
        self.stats.target_write_done += self.stats.target_write_stream
        self.stats.target_write_stream = 0.0
        call = channel.stream_stream(
            TRANSFER_METHOD, request_serializer=None, response_deserializer=target_pb2.TransferResponse.FromString
        )()
        try:
            resume = await self._open(call, p)
            self.stats.state = st.RUNNING
            window = asyncio.Semaphore(self.spec.window)
            sender = asyncio.create_task(self._send(call, executor, p, resume, window))
            acks = asyncio.create_task(self._read_acks(call, p, window))
            return await _first_result(sender, acks)
        except asyncio.CancelledError:
            call.cancel()
            raise
        except grpc.aio.AioRpcError as e:
            raise StreamBroken(e.code(), e.details() or "") from e
        except asyncio.InvalidStateError:  # the call ended while we wrote
            raise await _broken(call) from None
        finally:
            if not call.done():
                call.cancel()

    async def _open(self, call: Any, p: _Pass) -> int:
        open_msg = target_pb2.TransferOpen(
            ticket=self.spec.ticket,
            session_id=self.spec.session_id,
            disk_id=self.spec.disk_id,
            replica_path=self.spec.replica_path,
            disk_size=self.plan.disk_size,
            block_size=self.spec.block_size,
            window_batches=self.spec.window,
            pass_number=p.number,
            checkpoint_id=self.spec.checkpoint_id,
        )
        await call.write(encode_open(open_msg))
        msg = await asyncio.wait_for(call.read(), ACCEPT_TIMEOUT)
        if msg is grpc.aio.EOF:
            raise await _broken(call)
        if msg.HasField("error"):
            raise _refused(msg.error)
        if not msg.HasField("accept"):
            raise TransferError("the target's first answer is not an accept")
        resume = int(msg.accept.resume_offset)
        size, bs = self.plan.disk_size, self.spec.block_size
        if resume > size or (resume % bs and resume != size):
            raise TransferError(f"the target asks to resume at {resume}, not a block boundary of this disk")
        self._adopt_digest(p, resume, int.from_bytes(msg.accept.session_digest or b"", "big"))
        self.stats.committed_offset = resume
        log.info("stream_accepted", resume_offset=resume, pass_number=p.number)
        return resume

    @staticmethod
    def _adopt_digest(p: _Pass, resume: int, target_value: int) -> None:
        """Continue the pass's session digest from the resume offset, checking the target agrees."""
        if p.snapshots is not None and resume in p.snapshots:
            if p.snapshots[resume] != target_value:
                raise ChecksumMismatch(f"the target's session digest at offset {resume} differs from the proxy's")
            p.digest = p.snapshots[resume]
        else:
            # A fresh pass, or a prefix another proxy process sent: start from the target's value.
            p.digest = target_value
        p.snapshots = {resume: p.digest}

    async def _send(
        self, call: Any, executor: ThreadPoolExecutor, p: _Pass, resume: int, window: asyncio.Semaphore
    ) -> None:
        planned = plan_batches(p.plan, start=resume, batch_bytes=self.spec.batch_bytes, max_items=MAX_EXTENTS)
        batches = built_batches(p.builder, planned, executor=executor, depth=self.spec.threads + 1)
        try:
            async for b in batches:
                if self._stopping.is_set():
                    break
                t0 = time.perf_counter()
                await window.acquire()
                if self._bucket is not None:
                    await self._bucket.consume(len(b.frame))
                await call.write(b.frame)
                self.stats.network_wait += time.perf_counter() - t0
                p.digest = (p.digest + b.token_sum) % _MOD
                if p.snapshots is not None:
                    p.snapshots[b.end] = p.digest
                self._count(b)
                if b.final:
                    break
        finally:
            await batches.aclose()
        await call.done_writing()

    def _count(self, b: BuiltBatch) -> None:
        s = self.stats
        s.bytes_sent += len(b.frame)
        s.bytes_read += b.read_bytes
        s.bytes_data += b.data_bytes
        s.source_read += b.read_seconds
        s.compress += b.compress_seconds
        s.zero += b.zero_bytes
        s.unchanged += b.unchanged_bytes

    async def _read_acks(self, call: Any, p: _Pass, window: asyncio.Semaphore) -> bool:
        last_seq = -1
        while True:
            msg = await call.read()
            if msg is grpc.aio.EOF:
                code = await call.code()
                if code == grpc.StatusCode.OK and self._stopping.is_set():
                    return False
                raise await _broken(call)
            if msg.HasField("error"):
                raise _refused(msg.error)
            if not msg.HasField("ack"):
                raise TransferError("the target sent something other than an ack")
            ack = msg.ack
            if ack.seq <= last_seq and last_seq >= 0:
                raise TransferError(f"the target acknowledged batch {ack.seq} after {last_seq}")
            for _ in range(ack.seq - last_seq):
                window.release()
            last_seq = ack.seq
            if ack.committed_offset > self.stats.committed_offset:
                self._progress.touch()
            self.stats.committed_offset = ack.committed_offset
            self.stats.target_write_stream = ack.write_busy_seconds
            if p.snapshots is not None:
                p.snapshots = {k: v for k, v in p.snapshots.items() if k >= ack.committed_offset}
            if ack.complete:
                self._check_end_digest(p, int.from_bytes(ack.session_digest or b"", "big"))
                return True

    def _check_end_digest(self, p: _Pass, target_value: int) -> None:
        mine = p.snapshots.get(self.plan.disk_size) if p.snapshots is not None else None
        if mine is None or mine != target_value:
            raise ChecksumMismatch(
                f"end of disk, pass {p.number + 1}: the target's digest over everything it received differs "
                "from the proxy's over everything it sent"
            )
        log.info("session_digest_matches", pass_number=p.number, digest=f"{target_value:032x}")


def _refused(failure: target_pb2.TransferFailure) -> StreamBroken:
    """The target's in-band reason for ending the stream (trusted over the call status, see grpc#36066)."""
    code = grpc.StatusCode.__members__.get(failure.code, grpc.StatusCode.UNKNOWN)
    return StreamBroken(code, failure.message)


async def _broken(call: Any) -> StreamBroken:
    code = await call.code()
    details = await call.details()
    if code == grpc.StatusCode.OK:
        return StreamBroken(grpc.StatusCode.UNAVAILABLE, "the target ended the stream early")
    return StreamBroken(code, details or "")


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
