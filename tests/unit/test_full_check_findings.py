"""proxy_agent.full_check: which blocks a full check repaired, counted once, offsets merged and capped. Pure."""

from __future__ import annotations

from proxy_agent.full_check import FullCheckFindings
from vmrepl.extent import Extent

BS = 1024


def blocks(*numbers: int) -> list[Extent]:
    return [Extent(n * BS, BS) for n in numbers]


def test_blocks_the_changed_ranges_touch_are_changes_the_others_are_repaired() -> None:
    f = FullCheckFindings([Extent(2 * BS + 5, 1), Extent(10 * BS, 3 * BS)])
    f.record(blocks(0, 1, 2, 3, 9, 10, 12, 13))
    assert (f.differed, f.repaired) == (8, 5)
    assert f.ranges == [Extent(0, 2 * BS), Extent(3 * BS, BS), Extent(9 * BS, BS), Extent(13 * BS, BS)]
    msg = f.to_proto()
    assert (msg.differed_blocks, msg.repaired_blocks, len(msg.repaired_ranges)) == (8, 5, 4)


def test_blocks_sent_again_after_a_resume_count_once() -> None:
    f = FullCheckFindings([])
    f.record(blocks(1, 2, 5))
    f.record(blocks(2, 5, 6))  # the stream resumed at block 2
    assert (f.differed, f.repaired) == (4, 4)
    assert f.ranges == [Extent(BS, 2 * BS), Extent(5 * BS, 2 * BS)]


def test_the_offsets_are_capped_the_count_is_not() -> None:
    f = FullCheckFindings([], max_ranges=2)
    f.record(blocks(0, 2, 4, 5, 8))
    assert (f.differed, f.repaired) == (5, 5)
    assert f.ranges == [Extent(0, BS), Extent(2 * BS, BS)]


def test_nothing_differed_nothing_repaired() -> None:
    f = FullCheckFindings([Extent(0, 4 * BS)])
    f.record(blocks(0, 3))
    assert (f.differed, f.repaired, f.ranges) == (2, 0, [])
