import itertools

from proxy_agent.plan import make_plan, plan_batches
from vmrepl.extent import Extent, total

BS = 16
DISK = 160  # ten blocks


def test_full_plan_reads_allocated_blocks_and_zeroes_the_rest() -> None:
    plan = make_plan(disk_size=DISK, block_size=BS, allocated=[Extent(3, 2), Extent(40, 30)], changed=None, excluded=[])
    assert plan.read == [Extent(0, 16), Extent(32, 48)]
    assert plan.zero == [Extent(16, 16), Extent(80, 80)]
    assert plan.unallocated == 96 and plan.unchanged == 0 and plan.excluded == 0


def test_changed_ranges_are_aligned_and_limited_to_allocated() -> None:
    plan = make_plan(
        disk_size=DISK,
        block_size=BS,
        allocated=[Extent(0, 64)],
        changed=[Extent(20, 1), Extent(70, 5)],
        excluded=[],
    )
    assert plan.read == [Extent(16, 16)]
    assert plan.zero == [Extent(64, 16)]  # changed but unallocated now: zero it on the target
    assert plan.unchanged == DISK - 32


def test_exclusions_take_only_whole_blocks() -> None:
    plan = make_plan(
        disk_size=DISK, block_size=BS, allocated=[Extent(0, DISK)], changed=None, excluded=[Extent(10, 40)]
    )
    # Block 0 is only partly excluded: it is still read. Blocks 1 and 2 are wholly excluded.
    assert plan.read == [Extent(0, 16), Extent(48, 112)]
    assert plan.excluded == 32


def test_batches_are_contiguous_bounded_and_final() -> None:
    plan = make_plan(disk_size=DISK, block_size=BS, allocated=[Extent(0, 100)], changed=None, excluded=[])
    batches = list(plan_batches(plan, start=0, batch_bytes=32, max_items=100))
    assert batches[0].start == 0 and batches[-1].end == DISK and batches[-1].final
    assert sum(b.final for b in batches) == 1
    for a, b in itertools.pairwise(batches):
        assert a.end == b.start
    for b in batches:
        assert sum(i.length for i in b.items if i.read) <= 32
        assert all(i.length <= BS for i in b.items if i.read)
    assert sum(i.length for b in batches for i in b.items if i.read) == total(plan.read)


def test_batches_resume_from_an_offset() -> None:
    plan = make_plan(disk_size=DISK, block_size=BS, allocated=[Extent(0, DISK)], changed=None, excluded=[])
    batches = list(plan_batches(plan, start=96, batch_bytes=1 << 20, max_items=100))
    assert len(batches) == 1 and batches[0].start == 96
    assert [i.offset for i in batches[0].items] == [96, 112, 128, 144]


def test_nothing_to_send_still_gives_one_final_batch() -> None:
    plan = make_plan(disk_size=DISK, block_size=BS, allocated=[Extent(0, DISK)], changed=[], excluded=[])
    batches = list(plan_batches(plan, start=0, batch_bytes=32, max_items=10))
    assert len(batches) == 1 and batches[0].items == [] and batches[0].final and batches[0].end == DISK


def test_item_cap_splits_batches() -> None:
    plan = make_plan(disk_size=DISK, block_size=BS, allocated=[Extent(0, DISK)], changed=None, excluded=[])
    batches = list(plan_batches(plan, start=0, batch_bytes=1 << 20, max_items=3))
    assert all(len(b.items) <= 3 for b in batches) and len(batches) == 4
