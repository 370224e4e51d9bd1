"""One disk transfer: its passes, resumes and sampled verification, and a clean stop.

A transfer makes one pass over the disk, or two: after a changed-range pass,
a sample of the blocks it did not send is checked against the replica's
digests (proxy_agent/sampled.py), and a mismatch re-runs the disk as a full
digest comparison.

Each pass runs stream attempts (proxy_agent/attempt.py: open, send, acks)
until one completes. A break the stream can recover from (target restarted,
network cut) starts another attempt after a backoff; the proxy gives up only
after `resume_timeout` seconds without progress. Both ends keep a pass digest
over every extent of the pass (proxy_agent/pass_digest.py) and compare it at
every resume and at the end of the disk. The target is reached through a
`TargetLink` (proxy_agent/target_link.py), which the in-process tests fake.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import structlog
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_exponential, wait_random
from tenacity.wait import wait_base

from proxy_agent import stats as st
from proxy_agent.attempt import PassRun, StreamAttempt, StreamSettings
from proxy_agent.full_check import FullCheckFindings
from proxy_agent.pass_digest import PassDigestTracker
from proxy_agent.pipeline import BatchBuilder
from proxy_agent.plan import Plan
from proxy_agent.sampled import SampledVerification
from proxy_agent.target_link import StreamBroken, TargetLink, read_digest_table
from proxy_agent.throttle import TokenBucket
from vmrepl.batch import MAX_PASS
from vmrepl.disk.base import DiskReader
from vmrepl.domain import ChangeMode, Compression, retryable
from vmrepl.errors import VmreplError
from vmrepl.extent import Extent
from vmrepl.logs import get_logger
from vmrepl.progress import Sample
from vmrepl.v1 import proxy_pb2, target_pb2

__all__ = ["DiskTransfer", "StreamBroken", "TransferSpec"]

log = get_logger("vmrepl.proxy.transfer")
# Between stream attempts: 0.2 s doubling to 10 s, plus up to 1 s of jitter so proxies that lost one target
# spread out. (wait_exponential_jitter's `initial` is deprecated, and its replacement is newer than the
# tenacity versions this project supports.)
RETRY_WAIT: wait_base = wait_exponential(multiplier=0.2, max=10) + wait_random(0, 1)


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, StreamBroken):
        return retryable(exc.code)
    if isinstance(exc, grpc.aio.AioRpcError):  # ReadDigests
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
    # A full check (CompareDigests.full_check): the host's changed ranges, to tell repaired blocks from changes.
    full_check: tuple[Extent, ...] | None = None
    # Test only: the seed of the sample's random half instead of the transfer id (tests choose a block it misses).
    sample_seed: str = ""


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
        self,
        *,
        spec: TransferSpec,
        plan: Plan,
        full_plan: Callable[[], Plan],
        reader: DiskReader,
        link_factory: Callable[[], TargetLink],
        retry_wait: wait_base = RETRY_WAIT,
    ) -> None:
        self.spec = spec
        self._retry_wait = retry_wait
        self.plan = plan
        self._full_plan = full_plan
        self.stats = st.TransferStats(spec.transfer_id, spec.session_id, spec.disk_id, plan.disk_size)
        self.stats.threads = spec.threads
        if spec.full_check is not None:
            self.stats.full_check = FullCheckFindings(spec.full_check)
        self._reader = reader
        self._link_factory = link_factory
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
            link = self._link_factory()
            try:
                done = await self._passes(executor, link)
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
                await link.close()
                await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)
                await asyncio.to_thread(self._reader.close)

    async def _passes(self, executor: ThreadPoolExecutor, link: TargetLink) -> bool:
        done = await self._pass(executor, link, 0, self.plan, compare=self.spec.mode is ChangeMode.COMPARE)
        if not done or self.spec.mode is not ChangeMode.RANGES:
            return done
        outcome = await SampledVerification(
            reader=self._reader,
            plan=self.plan,
            block_size=self.spec.block_size,
            seed=self.spec.sample_seed or self.spec.transfer_id,
            replica_digests=lambda: self._replica_digests_retried(link),
        ).run(executor)
        self.stats.bytes_read += outcome.read_bytes  # counters change on the event loop only
        self.stats.sampled_blocks, self.stats.mismatched_blocks = outcome.sampled, outcome.mismatched
        if outcome.passed:
            log.info("sampled_verification_passed", sampled=outcome.sampled)
            return True
        log.warning("sampled_verification_failed", mismatched=outcome.mismatched, sampled=outcome.sampled)
        return await self._pass(executor, link, MAX_PASS, self._full_plan(), compare=True)

    def _retrying(self) -> AsyncRetrying:
        return AsyncRetrying(
            retry=retry_if_exception(_transient),
            wait=self._retry_wait,
            stop=self._progress,
            before_sleep=self._before_retry,
            reraise=True,
        )

    async def _pass(
        self, executor: ThreadPoolExecutor, link: TargetLink, number: int, plan: Plan, *, compare: bool
    ) -> bool:
        s = self.stats
        s.passes = number + 1
        s.unallocated, s.excluded, s.unchanged = plan.unallocated, plan.excluded, plan.unchanged
        table = await self._replica_digests_retried(link) if compare else None
        builder = BatchBuilder(
            self._reader,
            block_size=self.spec.block_size,
            compression=self.spec.compression,
            replica_digests=table,
            read_delay=self.spec.read_delay,
        )
        p = PassRun(number, plan, builder, PassDigestTracker(number=number, disk_size=plan.disk_size))
        async for attempt in self._retrying():
            with attempt:
                done = await self._attempt(executor, link, p)
        return done

    async def _replica_digests_retried(self, link: TargetLink) -> bytes:
        """The replica's digest table, asked again after a transient failure (a target restarting, or busy
        with as many digest reads as it takes: RESOURCE_EXHAUSTED), as the stream attempts are."""
        return await self._retrying()(self._replica_digests, link)

    async def _replica_digests(self, link: TargetLink) -> bytes:
        request = target_pb2.ReadDigestsRequest(
            replica_path=self.spec.replica_path,
            disk_id=self.spec.disk_id,
            session_id=self.spec.session_id,
            ticket=self.spec.ticket,
        )
        blocks = -(-self.plan.disk_size // self.spec.block_size)
        return await read_digest_table(link, request, block_size=self.spec.block_size, blocks=blocks)

    async def _attempt(self, executor: ThreadPoolExecutor, link: TargetLink, p: PassRun) -> bool:
        """One stream. True when the pass completed, False when it stopped on request."""
        if self._stopping.is_set():
            return False
        self.stats.target_write_done += self.stats.target_write_stream
        self.stats.target_write_stream = 0.0
        attempt = StreamAttempt(
            link.open_transfer(),
            opening=self._opening(),
            settings=StreamSettings(
                batch_bytes=self.spec.batch_bytes, window=self.spec.window, threads=self.spec.threads
            ),
            stats=self.stats,
            stopping=self._stopping,
            on_progress=self._progress.touch,
            bucket=self._bucket,
        )
        return await attempt.run(executor, p)

    def _opening(self) -> target_pb2.TransferOpen:
        """The open of every stream of this transfer (the attempt sets the pass)."""
        return target_pb2.TransferOpen(
            ticket=self.spec.ticket,
            session_id=self.spec.session_id,
            disk_id=self.spec.disk_id,
            replica_path=self.spec.replica_path,
            disk_size=self.plan.disk_size,
            block_size=self.spec.block_size,
            window_batches=self.spec.window,
            checkpoint_id=self.spec.checkpoint_id,
        )

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
            full_check_differed=s.full_check.differed if s.full_check is not None else None,
            blocks_repaired=s.full_check.repaired if s.full_check is not None else None,
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
