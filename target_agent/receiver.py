"""The receiving end of one Transfer stream.

Two coroutines per stream, joined by a bounded queue: the reader parses and
validates each frame on the event loop (cheap: headers only) and queues it;
the writer decodes, verifies and writes each batch in a worker thread,
commits every `ack_every` batches (flush data, then persist the offset) and
sends the ack. The queue bounds memory to about one window of batches.

Before anything is read, a stream takes a slot (bounded per proxy certificate
and in total); the open message has its own small size limit, and a stream
that stays silent (no open, or no batch while the target has nothing left to
do) is ended with DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import structlog
from cryptography.hazmat.primitives.asymmetric import ed25519

from target_agent import metrics
from target_agent.commit_pipeline import CommitPipeline, Queued
from target_agent.datastore import Datastore
from target_agent.replica import DiskGuard, ReplicaStream
from vmrepl.batch import (
    MAX_OPEN_BYTES,
    BatchDecoder,
    choose_version,
    decode_open,
)
from vmrepl.call_limits import Slots
from vmrepl.domain import check_block_size, check_disk_size
from vmrepl.errors import BatchError, DeadlineExceeded, InvalidArgument
from vmrepl.logs import get_logger
from vmrepl.names import check_name
from vmrepl.rpc import status_for
from vmrepl.security.ticket import verify_ticket
from vmrepl.security.tls import peer_identity
from vmrepl.v1 import target_pb2, ticket_pb2

log = get_logger("vmrepl.target.transfer")
DRAIN_TIMEOUT = 10.0


class TransferContext(Protocol):
    """What a Transfer stream needs of its gRPC servicer context (grpc.aio.ServicerContext has it)."""

    async def write(self, message: target_pb2.TransferResponse) -> None: ...

    def auth_context(self) -> Mapping[str, Sequence[bytes]]: ...


def check_open(o: target_pb2.TransferOpen, max_window: int) -> None:
    for field in ("session_id", "disk_id", "checkpoint_id"):
        check_name(f"open.{field}", getattr(o, field))
    check_disk_size("open.disk_size", o.disk_size)
    check_block_size("open.block_size", o.block_size)
    if not 2 <= o.window_batches <= max_window:
        raise InvalidArgument("open.window_batches", f"must be between 2 and {max_window}")


class Silence:
    """A stream's last sign of life: a message from the proxy, or a step of the target's own work.

    A proxy whose window is full waits for acks, so while the target is still writing or committing
    what it received the stream is not silent; it is when neither side did anything for `limit` s.
    """

    def __init__(self, limit: float, message: str) -> None:
        self.limit = limit
        self.message = message
        self.last = time.monotonic()

    def touch(self) -> None:
        self.last = time.monotonic()

    async def receive(self, requests: AsyncIterator[bytes]) -> bytes | None:
        """The next message, None at the end of the stream; DeadlineExceeded once silent for too long."""
        nxt = asyncio.ensure_future(_next(requests))
        try:
            while not nxt.done():
                left = self.last + self.limit - time.monotonic()
                if left <= 0:
                    raise DeadlineExceeded(self.message)
                # Not wait_for: cancelling a pending read would close the request iterator.
                await asyncio.wait({nxt}, timeout=left)
            self.touch()
            return nxt.result()
        finally:
            if not nxt.done():
                nxt.cancel()
                await asyncio.gather(nxt, return_exceptions=True)


async def _next(requests: AsyncIterator[bytes]) -> bytes | None:
    return await anext(requests, None)


class Receiver:
    def __init__(
        self,
        *,
        datastore: Datastore,
        keys: dict[str, ed25519.Ed25519PublicKey],
        name: str,
        max_window: int,
        guards: dict[str, DiskGuard],
        slots: Slots,
        open_timeout: float,
        idle_timeout: float,
        write_delay: float = 0.0,
    ) -> None:
        self._write_delay = write_delay  # test only
        self._datastore = datastore
        self._keys = keys
        self._name = name
        self._max_window = max_window
        self._guards = guards
        self._slots = slots
        self._open_timeout = open_timeout
        self._idle_timeout = idle_timeout

    def check_ticket(
        self,
        ticket: bytes,
        *,
        peer: str,
        session_id: str,
        disk_id: str,
        replica_path: str,
        checkpoint_id: str | None = None,
    ) -> ticket_pb2.TransferTicket:
        return verify_ticket(
            ticket,
            self._keys,
            session_id=session_id,
            disk_id=disk_id,
            replica_path=replica_path,
            checkpoint_id=checkpoint_id,
            audience=self._name,
            peer=peer,
        )

    def guard(self, disk_dir: Path) -> DiskGuard:
        """The one guard of a replica disk in this process (streams and restore point commits share it)."""
        return self._guards.setdefault(str(disk_dir), DiskGuard())

    async def run(self, requests: AsyncIterator[bytes], context: TransferContext) -> None:
        """Serve one stream if the proxy has a slot left (checked before anything is read)."""
        peer, _ = peer_identity(context)
        try:
            self._slots.take(peer)
        except Exception as e:
            await _refuse(context, e)
            raise
        try:
            await self._serve(peer, requests, context)
        finally:
            self._slots.give(peer)
            await _close(requests)

    async def _serve(self, peer: str, requests: AsyncIterator[bytes], context: TransferContext) -> None:
        """On failure tell the proxy in-band, drain what it still sends, and re-raise for the status."""
        try:
            first = await self._read_open(requests)
        except Exception as e:  # nothing to drain: the peer is silent, or sent what no proxy sends
            await _refuse(context, e)
            raise
        try:
            await self._run(peer, first, requests, context)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            await _refuse(context, e)
            if not isinstance(e, DeadlineExceeded):  # a silent proxy sends nothing more
                await _drain(requests)
            raise

    async def _read_open(self, requests: AsyncIterator[bytes]) -> bytes:
        """The first message, within the open timeout, checked against its own limit before it is parsed."""
        waiting = Silence(self._open_timeout, f"no open message within {self._open_timeout:g} s")
        first = await waiting.receive(requests)
        if first is None:
            raise BatchError("open", "the stream ended before its open message")
        if len(first) > MAX_OPEN_BYTES:
            raise BatchError("open", f"the open message has {len(first)} bytes, more than {MAX_OPEN_BYTES}")
        return first

    async def _run(self, peer: str, first: bytes, requests: AsyncIterator[bytes], context: TransferContext) -> None:
        """`peer`: the caller's certificate name (its role was checked by the roles table before any read)."""
        o = decode_open(first)
        version = choose_version(o.protocol_versions)  # before the ticket: a stream we cannot read is refused as such
        check_open(o, self._max_window)
        ticket = self.check_ticket(
            o.ticket,
            peer=peer,
            session_id=o.session_id,
            disk_id=o.disk_id,
            replica_path=o.replica_path,
            checkpoint_id=o.checkpoint_id,
        )
        log.info(
            "ticket_accepted", session_id=o.session_id, disk_id=o.disk_id, proxy=peer, expires_unix=ticket.expires_unix
        )
        disk_dir = self._datastore.disk_dir(o.replica_path, o.disk_id)
        stream = await asyncio.to_thread(
            ReplicaStream,
            disk_dir,
            self.guard(disk_dir),
            session_id=o.session_id,
            checkpoint_id=o.checkpoint_id,
            disk_size=o.disk_size,
            block_size=o.block_size,
            pass_number=o.pass_number,
        )
        with structlog.contextvars.bound_contextvars(session_id=o.session_id, disk_id=o.disk_id):
            metrics.STREAMS.inc()
            metrics.STREAMS_OPEN.inc()
            try:
                await self._stream(stream, o, version, requests, context)
            finally:
                metrics.STREAMS_OPEN.dec()
                await asyncio.to_thread(stream.close)

    async def _stream(
        self,
        stream: ReplicaStream,
        o: target_pb2.TransferOpen,
        version: int,
        requests: AsyncIterator[bytes],
        context: TransferContext,
    ) -> None:
        ack_every = max(1, o.window_batches // 2)
        resume = stream.resume_offset
        log.info(
            "stream_opened",
            resume_offset=resume,
            disk_size=o.disk_size,
            replica=o.replica_path,
            pass_number=o.pass_number,
            checkpoint_id=o.checkpoint_id,
        )
        accept = target_pb2.TransferAccept(
            resume_offset=resume,
            session_digest=stream.pass_digest.to_wire(),
            protocol_version=version,
        )
        await context.write(target_pb2.TransferResponse(accept=accept))
        queue: asyncio.Queue[Queued] = asyncio.Queue(maxsize=o.window_batches)
        silence = Silence(self._idle_timeout, f"the stream was silent for {self._idle_timeout:g} s")

        async def send_ack(ack: target_pb2.TransferAck) -> None:
            await context.write(target_pb2.TransferResponse(ack=ack))

        pipeline = CommitPipeline(
            stream, ack_every=ack_every, send_ack=send_ack, touch=silence.touch, write_delay=self._write_delay
        )
        writer = asyncio.create_task(pipeline.run(queue))
        try:
            await self._read_loop(stream, o, requests, queue=queue, writer=writer, silence=silence)
            await writer
        finally:
            if not writer.done():
                writer.cancel()
                await asyncio.gather(writer, return_exceptions=True)

    async def _read_loop(
        self,
        stream: ReplicaStream,
        o: target_pb2.TransferOpen,
        requests: AsyncIterator[bytes],
        *,
        queue: asyncio.Queue[Queued],
        writer: asyncio.Task[None],
        silence: Silence,
    ) -> None:
        decoder = BatchDecoder(disk_size=o.disk_size, block_size=o.block_size, start=stream.resume_offset)
        while (raw := await silence.receive(requests)) is not None:
            if writer.done():
                writer.result()  # the writer failed: raise its error
                return
            batch = decoder.receive(raw)
            log.debug(
                "batch_received",
                seq=batch.seq,
                start=batch.start,
                end=batch.end,
                data_bytes=batch.data_bytes,
                wire_bytes=batch.wire_bytes,
            )
            metrics.BATCHES.inc()
            metrics.BYTES.labels("wire").inc(batch.wire_bytes)
            await _put(queue, batch, writer)
            if batch.final:
                return
        # The proxy half-closed without a final batch (it was cancelled): keep what arrived.
        await _put(queue, None, writer)


def failure_response(code: str, message: str) -> target_pb2.TransferResponse:
    """Why a stream ends, sent before its status (see TransferFailure in target.proto)."""
    return target_pb2.TransferResponse(error=target_pb2.TransferFailure(code=code, message=message))


async def _refuse(context: TransferContext, e: Exception) -> None:
    """Tell the proxy in-band why its stream ends."""
    code, message = status_for(e)
    metrics.ERRORS.labels(code.name).inc()
    with contextlib.suppress(Exception):
        await context.write(failure_response(code.name, message))


async def _close(requests: AsyncIterator[bytes]) -> None:
    """Close gRPC's request generator: suspended, it holds the last message (up to 16 MiB) until collected."""
    close = getattr(requests.__aiter__(), "aclose", None)
    if close is not None:
        with contextlib.suppress(Exception):  # e.g. a read still pending when the stream failed
            await close()


async def _drain(requests: AsyncIterator[bytes]) -> None:
    """Discard what the proxy still sends until it half-closes (it stops once it reads the failure)."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(DRAIN_TIMEOUT):
            async for _ in requests:
                pass


async def _put(queue: asyncio.Queue[Queued], item: Queued, writer: asyncio.Task[None]) -> None:
    """Queue an item, or raise the writer's error if it dies while the queue is full."""
    if not queue.full():
        queue.put_nowait(item)
        return
    put = asyncio.ensure_future(queue.put(item))
    await asyncio.wait({put, writer}, return_when=asyncio.FIRST_COMPLETED)
    if not put.done():
        put.cancel()
        writer.result()  # raises the writer's exception
        raise BatchError("stream", "the writer stopped")
