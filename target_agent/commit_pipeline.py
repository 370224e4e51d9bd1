"""The target's write side of one Transfer stream: apply batches in order, commit, acknowledge.

Every `ack_every` batches (and after the final one, or when the proxy half-closed early) the pipeline
starts a commit: flush the data and digests, then durably record the offset. At most one commit is in
flight, so the disk keeps writing the next batches while the previous commit flushes; each commit is
acknowledged once it is durable, never before.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from target_agent import metrics
from target_agent.replica import COMPLETE, CommitPoint, DiskState
from vmrepl.batch import DecodedBatch, ReceivedBatch
from vmrepl.logs import get_logger
from vmrepl.v1 import target_pb2

log = get_logger("vmrepl.target.transfer")

# A queued batch, or None: the proxy half-closed without a final batch (it was cancelled).
Queued = ReceivedBatch | None


class ReplicaSink(Protocol):
    """What the pipeline needs of a replica disk (target_agent.replica.ReplicaStream); blocking calls."""

    def apply(self, batch: DecodedBatch) -> int: ...

    def mark(self, offset: int, *, final: bool) -> CommitPoint: ...

    def commit(self, point: CommitPoint) -> DiskState: ...


class CommitPipeline:
    def __init__(
        self,
        sink: ReplicaSink,
        *,
        ack_every: int,
        send_ack: Callable[[target_pb2.TransferAck], Awaitable[None]],
        touch: Callable[[], None],
        write_delay: float = 0.0,
    ) -> None:
        self._sink = sink
        self._ack_every = ack_every
        self._send_ack = send_ack
        self._touch = touch  # a sign of life: the stream is not silent while the target works
        self._write_delay = write_delay  # test only
        self.busy = 0.0  # seconds spent decoding, writing and flushing
        self.received = 0  # raw data bytes applied
        self._pending = 0  # batches applied since the last commit started
        self._last: ReceivedBatch | None = None
        self._inflight: tuple[asyncio.Task[DiskState], int] | None = None

    async def run(self, queue: asyncio.Queue[Queued]) -> None:
        """Until the final batch (or the early end) is committed and acknowledged."""
        try:
            while True:
                item = await queue.get()
                if item is not None:
                    await self._apply(item)
                ended = item is None or item.final
                last = self._last
                if last is not None and self._pending and (ended or self._pending >= self._ack_every):
                    await self._start_commit(last)
                if ended:
                    await self._settle()
                    return
        finally:
            await self._abandon()

    async def _apply(self, batch: ReceivedBatch) -> None:
        """Decode, verify and write one batch in a worker thread."""
        t0 = time.perf_counter()
        data = await asyncio.to_thread(lambda: self._sink.apply(batch.decode()))
        if self._write_delay:
            await asyncio.sleep(self._write_delay)
        self._touch()
        spent = time.perf_counter() - t0
        metrics.WRITE_BUSY.inc(spent)
        metrics.BYTES.labels("data").inc(data)
        self.busy += spent
        self.received += data
        self._pending += 1
        self._last = batch

    async def _start_commit(self, last: ReceivedBatch) -> None:
        """Settle the commit in flight, then start one for everything applied so far (up to `last`)."""
        await self._settle()
        point = self._sink.mark(last.end, final=last.final)
        self._inflight = (asyncio.create_task(asyncio.to_thread(self._sink.commit, point)), last.seq)
        self._pending = 0

    async def _settle(self) -> None:
        """Wait for the commit in flight to be durable and acknowledge it."""
        if self._inflight is None:
            return
        task, seq = self._inflight
        t0 = time.perf_counter()
        st = await task
        self._inflight = None
        self._touch()
        self.busy += time.perf_counter() - t0
        ack = target_pb2.TransferAck(
            seq=seq,
            committed_offset=st.committed_offset,
            complete=st.state == COMPLETE,
            write_busy_seconds=self.busy,
            session_digest=st.session_digest.to_wire(),
        )
        await self._send_ack(ack)
        log.debug("committed", offset=st.committed_offset, seq=seq, complete=ack.complete)
        if ack.complete:
            log.info("transfer_complete", bytes_written=st.bytes_written)

    async def _abandon(self) -> None:
        if self._inflight is not None and not self._inflight[0].done():
            self._inflight[0].cancel()
            await asyncio.gather(self._inflight[0], return_exceptions=True)
