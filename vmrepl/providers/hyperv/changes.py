"""Which ranges of a frozen disk changed since an RCT id: the `disk_changes` script called window by window.

GetVirtualDiskChanges may cover less than it was asked (ProcessedByteLength), so the whole disk is covered
by calling again from where the host stopped, never assuming one call answers (fact sheet 1.7, trap 4).
Everything the host says is checked before it is believed: a range outside the disk, a processed length
past the window, no progress, or more calls or ranges than the limits allow all end as `Untracked` with
the reason, and the session compares digests instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import BaseModel

from vmrepl.errors import HostError
from vmrepl.extent import Extent, merge
from vmrepl.providers.base import DiskInCheckpoint, Untracked
from vmrepl.providers.hyperv import models as m

MiB = 1024**2
GiB = 1024**3


class _Runner(Protocol):
    async def run(self, name: str, params: BaseModel) -> Any: ...


@dataclass(frozen=True, slots=True)
class ChangeLimits:
    # ByteLength of each GetVirtualDiskChanges call (the docs want it below the disk's size).
    chunk: int = GiB
    # The span one script call covers: several chunks, so a long disk is a few round trips, each bounded.
    window: int = 16 * GiB
    # The script returns early once it holds this many ranges: its output stays small.
    max_ranges: int = 20_000
    # Past this many ranges sent by the host (counted as sent, before merging), or this many script calls, the
    # host's answer is not used.
    max_total_ranges: int = 1_000_000
    max_calls: int = 100_000

    def __post_init__(self) -> None:
        if self.chunk < 1 or self.window < self.chunk or self.max_ranges < 1:
            raise ValueError(f"change limits need 1 <= chunk <= window and max_ranges >= 1: {self}")
        if self.max_total_ranges < 1 or self.max_calls < 1:
            raise ValueError(f"change limits need max_total_ranges and max_calls >= 1: {self}")


def chunk_for(size: int, chunk: int) -> int:
    """The call length for a disk of `size`: below the disk's size where it can be (MiB-aligned)."""
    if chunk < size or size <= 2 * MiB:
        return chunk
    return (size // 2) // MiB * MiB


async def read_changes(
    runner: _Runner, *, disk: DiskInCheckpoint, limit_id: str, limits: ChangeLimits, timeout_seconds: int
) -> list[Extent] | Untracked:
    """The merged changed ranges of `disk` since `limit_id`, or Untracked with the reason."""
    found: list[Extent] = []  # as the host sent them: merged once, at the end
    offset = 0
    calls = 0
    while offset < disk.size:
        calls += 1
        if calls > limits.max_calls:
            return Untracked(f"disk {disk.disk_id}: more than {limits.max_calls} GetVirtualDiskChanges calls")
        length = min(limits.window, disk.size - offset)
        params = m.DiskChangesParams(
            path=disk.locator,
            limit_id=limit_id,
            offset=offset,
            length=length,
            chunk=chunk_for(disk.size, limits.chunk),
            max_ranges=limits.max_ranges,
            timeout_seconds=timeout_seconds,
        )
        try:
            result = await runner.run("disk_changes", params)
        except HostError as e:
            code = f" (code {e.code})" if e.code is not None else ""
            return Untracked(f"GetVirtualDiskChanges failed for disk {disk.disk_id}: {e.description}{code}")
        step = _check(result, disk, offset, length)
        if isinstance(step, Untracked):
            return step
        processed, ranges = step
        # Every range sent counts: merged after each call, a host repeating the same ranges with one byte
        # processed kept the list short, was asked up to max_calls times, and each merge re-sorted it all on
        # the event loop. An honest host's windows do not overlap, so its count is the merged one (+1 a window).
        found += ranges
        if len(found) > limits.max_total_ranges:
            return Untracked(f"disk {disk.disk_id}: more than {limits.max_total_ranges} changed ranges")
        offset += processed
    return merge(found)


def _check(result: Any, disk: DiskInCheckpoint, offset: int, length: int) -> tuple[int, list[Extent]] | Untracked:
    """One script answer, believed only when it stays inside the window and the disk and makes progress."""
    where = f"disk {disk.disk_id}"
    if not isinstance(result, m.DiskChanges):
        return Untracked(f"{where}: the host's answer to disk_changes is not a change list")
    if result.processed > length:
        return Untracked(f"{where}: the host reported {result.processed} bytes processed of a {length}-byte window")
    ranges: list[Extent] = []
    for r in result.ranges:
        if r.offset + r.length > disk.size:
            return Untracked(
                f"{where}: the host reported a changed range past the end of the disk"
                f" ({r.offset}+{r.length} > {disk.size} bytes)"
            )
        ranges.append(Extent(r.offset, r.length))
    if result.stalled or result.processed == 0:
        return Untracked(
            f"{where}: GetVirtualDiskChanges stalled at offset {offset + result.processed} (it processed 0 bytes)"
        )
    return result.processed, ranges
