"""Reading a restore point's disk in large pieces on a bounded pool of threads (verification and export).

A call keeps at most `depth` reads in flight, each into a buffer of its own that is reused for the next
piece, and takes the results in order. The threads are the servicer's one pool, so however many calls
run, the disks see at most that many reads at once.

A caller that goes away mid-read (the client cancelled, the stream broke) leaves reads running in the
pool: the disk is closed only when the last of them ends, so no thread ever reads a closed (and maybe
already reused) descriptor, and the event loop never waits for a disk.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import AsyncGenerator, Callable, Iterable
from concurrent.futures import Executor
from pathlib import Path
from typing import TypeVar

from target_agent import replica
from target_agent.points import PointDisk, open_point_disk
from vmrepl.errors import FailedPrecondition, NotFound
from vmrepl.extent import Extent

Item = TypeVar("Item")
T = TypeVar("T")
READS_IN_FLIGHT = 2  # per call: one piece read while the previous one is hashed or sent


class PointReads:
    """The reads of one open PointDisk; `close` closes the disk once no read of it runs any more."""

    def __init__(self, disk: PointDisk, executor: Executor, *, buffer_bytes: int, depth: int = READS_IN_FLIGHT) -> None:
        self.disk = disk
        self._executor = executor
        self._buffer_bytes = buffer_bytes
        self._depth = depth
        self._lock = threading.Lock()
        self._running = 0
        self._closing = False

    async def extents(self) -> list[Extent]:
        """The disk's allocated extents, found in the pool (counted as a read: the disk stays open for it)."""
        return await self._submit(asyncio.get_running_loop(), _extents, bytearray(), None)

    async def ordered(
        self, items: Iterable[Item], work: Callable[[PointDisk, bytearray, Item], T]
    ) -> AsyncGenerator[T, None]:
        """`work(disk, buffer, item)` for each item in the pool, its results in the items' order."""
        loop = asyncio.get_running_loop()
        free: list[bytearray] = []
        inflight: deque[tuple[asyncio.Future[T], bytearray]] = deque()
        pending = iter(items)
        done = False
        while True:
            while not done and len(inflight) < self._depth:
                item = next(pending, _END)
                if item is _END:
                    done = True
                    break
                # Buffers are made as needed (a disk of one small piece needs one), then reused.
                buf = free.pop() if free else bytearray(self._buffer_bytes)
                inflight.append((self._submit(loop, work, buf, item), buf))  # type: ignore[arg-type]
            if not inflight:
                return
            future, buf = inflight.popleft()
            result = await future
            free.append(buf)
            yield result

    def _submit(
        self,
        loop: asyncio.AbstractEventLoop,
        work: Callable[[PointDisk, bytearray, Item], T],
        buf: bytearray,
        item: Item,
    ) -> asyncio.Future[T]:
        with self._lock:
            if self._closing:
                raise RuntimeError("reads of a closed disk")
            self._running += 1
        future = loop.run_in_executor(self._executor, self._run, work, buf, item)
        # A caller gone mid-read never awaits the rest: their errors are theirs to drop, not asyncio's to log.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        return future

    def _run(self, work: Callable[[PointDisk, bytearray, Item], T], buf: bytearray, item: Item) -> T:
        try:
            return work(self.disk, buf, item)
        finally:
            with self._lock:
                self._running -= 1
                last = self._closing and self._running == 0
            if last:
                self.disk.close()

    def close(self) -> None:
        with self._lock:
            self._closing = True
            now = self._running == 0
        if now:
            self.disk.close()


def _extents(disk: PointDisk, _buf: bytearray, _item: None) -> list[Extent]:
    return disk.allocated_extents()


async def open_reads(
    vm_dir: Path, point_id: str, disk_id: str, executor: Executor, *, buffer_bytes: Callable[[PointDisk], int]
) -> PointReads:
    """Disk `disk_id` of the point opened (in a thread) for reads; a caller gone while it opens leaves
    nothing open (the open finishes in its thread, and what it opened is closed there)."""
    opening = asyncio.get_running_loop().run_in_executor(executor, open_point_disk, vm_dir, point_id, disk_id)
    try:
        disk = await asyncio.shield(opening)
    except asyncio.CancelledError:
        opening.add_done_callback(_close_opened)
        raise
    return PointReads(disk, executor, buffer_bytes=buffer_bytes(disk))


def _close_opened(opening: asyncio.Future[PointDisk]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        opening.result().close()


_END: object = object()


def disk_dir(vm_dir: Path, disk_id: str) -> Path:
    return vm_dir / "disks" / disk_id


def snapshot(vm_dir: Path, disk_id: str) -> replica.DiskState | None:
    """The replica disk's state as its reader found it, to tell afterwards whether a session changed it."""
    try:
        return replica.load_state(disk_dir(vm_dir, disk_id))
    except NotFound:
        return None


def check_unchanged(vm_dir: Path, disk_id: str, before: replica.DiskState | None) -> None:
    """Raise FailedPrecondition if the replica disk's state moved since `before`: a session prepared (and
    may have written) the disk while it was read, so what was read may mix two states.

    Reads take no lock on the disk (a verification of a large disk must not hold up a session for hours);
    a session that starts meanwhile makes the reader's answer void instead, and says so."""
    after = snapshot(vm_dir, disk_id)
    if after != before:
        session = after.session_id if after is not None else "?"
        raise FailedPrecondition(
            f"replica disk {disk_id} was prepared for session {session} while it was read: what was read may "
            "mix two states; read it again when no session writes the replica"
        )
