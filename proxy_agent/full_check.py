"""What a periodic full check found: the blocks its digest comparison sent, and which the change tracking missed.

A full check (the controller's Job.full_check_every, or StartJob's full_check) compares every block's digest
where the host's changed ranges would otherwise have been trusted, and hands the proxy those ranges
(CompareDigests.full_check). A block the comparison sends differs from the replica. If the changed ranges
name it, a changed-range incremental would have sent it too: an ordinary change. If they do not, the change
tracking missed a write and a changed-range incremental would have left the replica wrong there: the full
check repaired it. Those blocks are counted and their offsets kept (merged, the first MAX_RANGES ranges).

Blocks are recorded as their batches are sent, in offset order within a stream. A stream that breaks is
resumed from the target's committed offset, below what was sent, so blocks already recorded come again;
they are recognised by their offset (below the highest end recorded) and counted once.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

from vmrepl.extent import Extent, merge
from vmrepl.v1 import common_pb2

# The repaired blocks' offsets are reported as at most this many merged ranges (the count is always exact).
MAX_RANGES = 1000


class FullCheckFindings:
    def __init__(self, tracked: Iterable[Extent], *, max_ranges: int = MAX_RANGES) -> None:
        self._tracked = merge(tracked)
        self._starts = [e.offset for e in self._tracked]
        self._max_ranges = max_ranges
        self._end = 0  # the end of the highest block recorded: blocks below it were counted already
        self.differed = 0
        self.repaired = 0
        self.ranges: list[Extent] = []

    def tracked(self, block: Extent) -> bool:
        """Whether the host's changed ranges touch this block (a changed-range pass would have sent it)."""
        i = bisect.bisect_right(self._starts, block.offset)
        if i and self._tracked[i - 1].end > block.offset:
            return True
        return i < len(self._tracked) and self._tracked[i].offset < block.end

    def record(self, blocks: Iterable[Extent]) -> None:
        """Blocks just sent because they differ from the replica, in offset order."""
        for b in blocks:
            if b.offset < self._end:  # sent again after a resume
                continue
            self._end = b.end
            self.differed += 1
            if self.tracked(b):
                continue
            self.repaired += 1
            if self.ranges and self.ranges[-1].end == b.offset:
                self.ranges[-1] = Extent(self.ranges[-1].offset, self.ranges[-1].length + b.length)
            elif len(self.ranges) < self._max_ranges:
                self.ranges.append(b)

    def to_proto(self) -> common_pb2.FullCheck:
        return common_pb2.FullCheck(
            differed_blocks=self.differed,
            repaired_blocks=self.repaired,
            repaired_ranges=[common_pb2.ByteRange(offset=e.offset, length=e.length) for e in self.ranges],
        )
