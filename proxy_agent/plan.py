"""What a transfer reads and sends, as pure functions over extents.

`make_plan` decides, for the whole disk, which blocks are read and which
ranges only need zeroing on the target; `plan_batches` walks the plan from
a resume offset and groups it into batches. Neither touches a disk.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from vmrepl.extent import Extent, align_in, align_out, complement, intersect, merge, split_blocks, subtract, total


@dataclass(frozen=True, slots=True)
class Item:
    offset: int
    length: int
    # True: a block to read (it may still turn out all zero); False: unallocated, zero on the target.
    read: bool

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True, slots=True)
class Plan:
    disk_size: int
    block_size: int
    read: list[Extent]
    zero: list[Extent]
    unallocated: int
    excluded: int
    unchanged: int


def make_plan(
    *,
    disk_size: int,
    block_size: int,
    allocated: list[Extent],
    changed: list[Extent] | None,
    excluded: list[Extent],
) -> Plan:
    """Blocks to read and ranges to zero; `changed` None means every block is a candidate."""
    whole = [Extent(0, disk_size)]
    candidates = whole if changed is None else align_out(merge(changed), block_size, disk_size)
    excl = align_in(excluded, block_size, disk_size)  # a partly excluded block must still travel
    kept = subtract(candidates, excl)
    read = intersect(align_out(merge(allocated), block_size, disk_size), kept)
    zero = subtract(kept, read)
    return Plan(
        disk_size=disk_size,
        block_size=block_size,
        read=read,
        zero=zero,
        unallocated=total(zero),
        excluded=total(intersect(candidates, excl)),
        unchanged=total(complement(candidates, 0, disk_size)),
    )


@dataclass(slots=True)
class PlannedBatch:
    start: int
    end: int
    items: list[Item] = field(default_factory=list)
    final: bool = False


def _items(plan: Plan, start: int) -> Iterator[Item]:
    tagged = sorted(
        [(e, True) for e in plan.read if e.end > start] + [(e, False) for e in plan.zero if e.end > start],
        key=lambda t: t[0].offset,
    )
    for e, read in tagged:
        lo = max(e.offset, start)
        if read:
            for b in split_blocks([Extent(lo, e.end - lo)], plan.block_size):
                yield Item(b.offset, b.length, True)
        else:
            yield Item(lo, e.end - lo, False)


def plan_batches(plan: Plan, *, start: int, batch_bytes: int, max_items: int) -> Iterator[PlannedBatch]:
    """Batches covering [start, disk size) back to back; each holds at most `batch_bytes`
    of blocks to read (at least one block) and at most `max_items` items; the last is final."""
    cur = PlannedBatch(start=start, end=start)
    data = 0
    for item in _items(plan, start):
        if cur.items and ((item.read and data + item.length > batch_bytes) or len(cur.items) >= max_items):
            yield cur
            cur = PlannedBatch(start=cur.end, end=cur.end)
            data = 0
        cur.items.append(item)
        cur.end = item.end
        data += item.length if item.read else 0
    cur.end = plan.disk_size
    cur.final = True
    yield cur
