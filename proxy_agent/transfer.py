"""One disk transfer: stream batches to the target, resume after breaks, stop cleanly.

An attempt opens the Transfer stream, learns the offset to resume from,
plans batches from there and sends them with at most `window` batches
unacknowledged. A break the stream can recover from (target restarted,
network cut) starts another attempt after a backoff; the proxy gives up
only after `resume_timeout` seconds without progress.
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

from protos.vmrepl.v1 import proxy_pb2, target_pb2
from proxy_agent import stats as st
from proxy_agent.pipeline import BatchBuilder, BuiltBatch, built_batches
from proxy_agent.plan import Plan, plan_batches
from proxy_agent.throttle import TokenBucket
from vmrepl.batch import MAX_EXTENTS, MAX_MESSAGE_BYTES, encode_open
from vmrepl.block import Compression
from vmrepl.disk.base import DiskReader
from vmrepl.errors import TransferCancelled, TransferError, VmreplError
from vmrepl.logs import get_logger

log = get_logger("vmrepl.proxy.transfer")
TRANSFER_METHOD = "/vmrepl.v1.TargetAgent/Transfer"
ACCEPT_TIMEOUT = 30.0
STOP_GRACE = 15.0
# Statuses after which another attempt cannot succeed.
_PERMANENT = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.DATA_LOSS,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.ALREADY_EXISTS,
    }
)


class StreamBroken(Exception):
    """The Transfer stream ended before the transfer did."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, StreamBroken):
        return exc.code not in _PERMANENT
    return isinstance(exc, (TimeoutError, ConnectionError))


@dataclass(frozen=True, slots=True)
class TransferSpec:
    transfer_id: str
    session_id: str
    disk_id: str
    replica_path: str
    ticket: bytes
    block_size: int
    compression: Compression
    bandwidth_bytes_per_s: float
    resume_timeout: float
    batch_bytes: int
    window: int
    threads: int


class _Progress:
    """tenacity stop condition: give up after `timeout` seconds without the committed offset moving."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.stamp = time.monotonic()

    def touch(self) -> None:
        self.stamp = time.monotonic()

    def __call__(self, state: RetryCallState) -> bool:
        return time.monotonic() - self.stamp > self.timeout


class DiskTransfer:
    def __init__(
        self, *, spec: TransferSpec, plan: Plan, reader: DiskReader, channel_factory: Callable[[], Any]
    ) -> None:
        self.spec = spec
        self.plan = plan
        self.stats = st.TransferStats(spec.transfer_id, spec.session_id, spec.disk_id, plan.disk_size)
        self.stats.unallocated, self.stats.excluded, self.stats.unchanged = (
            plan.unallocated,
            plan.excluded,
            plan.unchanged,
        )
        self._reader = reader
        self._channel_factory = channel_factory
        self._stopping = asyncio.Event()
        self._progress = _Progress(spec.resume_timeout)
        self._bucket = (
            TokenBucket(rate=spec.bandwidth_bytes_per_s, burst=max(spec.bandwidth_bytes_per_s / 10, MAX_MESSAGE_BYTES))
            if spec.bandwidth_bytes_per_s > 0
            else None
        )
        self._builder = BatchBuilder(reader, block_size=spec.block_size, compression=spec.compression)
        self.task: asyncio.Task[None] | None = None

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
                await self._attempts(executor, channel)
            except asyncio.CancelledError:
                self._finish(st.CANCELLED, "CANCELLED", "cancelled")
                raise
            except Exception as e:  # every failure ends as a state the controller can read
                self._fail(e)
            finally:
                await channel.close()
                await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)
                await asyncio.to_thread(self._reader.close)

    async def _attempts(self, executor: ThreadPoolExecutor, channel: Any) -> None:
        retrying = AsyncRetrying(
            retry=retry_if_exception(_transient),
            wait=wait_exponential_jitter(initial=0.2, max=10),
            stop=self._progress,
            before_sleep=self._before_retry,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                done = await self._attempt(executor, channel)
        if done:
            self._finish(st.COMPLETED)
        else:
            self._finish(st.CANCELLED, "CANCELLED", "stopped; resumable from the committed offset")

    def _before_retry(self, state: RetryCallState) -> None:
        self.stats.state = st.RECONNECTING
        self.stats.resumes += 1
        exc = state.outcome.exception() if state.outcome else None
        log.warning(
            "stream_broken",
            error=str(exc),
            committed_offset=self.stats.committed_offset,
            attempt=state.attempt_number,
        )

    def _finish(self, state: proxy_pb2.TransferState.ValueType, code: str = "", message: str = "") -> None:
        self.stats.state, self.stats.error_code, self.stats.error_message = state, code, message
        self.stats.ended = time.monotonic()
        log.info(
            "transfer_ended",
            state=proxy_pb2.TransferState.Name(state),
            error=message or None,
            bytes_sent=self.stats.bytes_sent,
            bytes_data=self.stats.bytes_data,
            resumes=self.stats.resumes,
            elapsed=round(self.stats.ended - self.stats.started, 3),
        )

    def _fail(self, e: Exception) -> None:
        if isinstance(e, StreamBroken):
            self._finish(st.FAILED, e.code.name, e.details)
        elif isinstance(e, VmreplError):
            self._finish(st.FAILED, e.grpc_code, str(e))
        else:
            log.exception("transfer_internal_error")
            self._finish(st.FAILED, "INTERNAL", f"{type(e).__name__}: {e}")

    async def _attempt(self, executor: ThreadPoolExecutor, channel: Any) -> bool:
        """One stream. True when the transfer completed, False when it stopped on request."""
        if self._stopping.is_set():
            return False
        self.stats.target_write_done += self.stats.target_write_stream
        self.stats.target_write_stream = 0.0
        call = channel.stream_stream(
            TRANSFER_METHOD,
            request_serializer=None,
            response_deserializer=target_pb2.TransferResponse.FromString,
        )()
        try:
            resume = await self._open(call)
            self.stats.state = st.RUNNING
            window = asyncio.Semaphore(self.spec.window)
            sender = asyncio.create_task(self._send(call, executor, resume, window))
            acks = asyncio.create_task(self._read_acks(call, window))
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

    async def _open(self, call: Any) -> int:
        open_msg = target_pb2.TransferOpen(
            ticket=self.spec.ticket,
            session_id=self.spec.session_id,
            disk_id=self.spec.disk_id,
            replica_path=self.spec.replica_path,
            disk_size=self.plan.disk_size,
            block_size=self.spec.block_size,
            window_batches=self.spec.window,
        )
        await call.write(encode_open(open_msg))
        msg = await asyncio.wait_for(call.read(), ACCEPT_TIMEOUT)
        if msg is grpc.aio.EOF:
            raise await _broken(call)
        if not msg.HasField("accept"):
            raise TransferError("the target's first answer is not an accept")
        resume = msg.accept.resume_offset
        size, bs = self.plan.disk_size, self.spec.block_size
        if resume > size or (resume % bs and resume != size):
            raise TransferError(f"the target asks to resume at {resume}, not a block boundary of this disk")
        if self.stats.committed_offset and resume < self.stats.committed_offset:
            log.warning("target_went_back", committed=self.stats.committed_offset, resume_offset=resume)
        self.stats.committed_offset = resume
        log.info("stream_accepted", resume_offset=resume)
        return int(resume)

    async def _send(self, call: Any, executor: ThreadPoolExecutor, resume: int, window: asyncio.Semaphore) -> None:
        planned = plan_batches(self.plan, start=resume, batch_bytes=self.spec.batch_bytes, max_items=MAX_EXTENTS)
        batches = built_batches(self._builder, planned, executor=executor, depth=self.spec.threads + 1)
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

    async def _read_acks(self, call: Any, window: asyncio.Semaphore) -> bool:
        last_seq = -1
        while True:
            msg = await call.read()
            if msg is grpc.aio.EOF:
                code = await call.code()
                if code == grpc.StatusCode.OK and self._stopping.is_set():
                    return False
                raise await _broken(call)
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
            if ack.complete:
                return True


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
            if t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
        result = await acks
        await sender
        return result
    finally:
        for t in (sender, acks):
            if not t.done():
                t.cancel()
        await asyncio.gather(sender, acks, return_exceptions=True)


__all__ = ["DiskTransfer", "StreamBroken", "TransferCancelled", "TransferSpec"]
