"""proxy_agent.full_check: which blocks a full check repaired, counted once, offsets merged and capped. Pure."""

from __future__ import annotations

import pytest

from proxy_agent.full_check import FullCheckFindings
from proxy_agent.request import plans_for
from vmrepl.errors import InvalidArgument
from vmrepl.extent import Extent
from vmrepl.v1 import common_pb2, proxy_pb2

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


def _request(full_check: list[tuple[int, int]] | None) -> proxy_pb2.StartDiskTransferRequest:
    compare = proxy_pb2.CompareDigests()
    if full_check is not None:
        compare.full_check.CopyFrom(
            proxy_pb2.ChangedRanges(ranges=[common_pb2.ByteRange(offset=o, length=n) for o, n in full_check])
        )
    return proxy_pb2.StartDiskTransferRequest(
        block_size=64 * 1024, change_source=proxy_pb2.ChangeSource(compare_digests=compare)
    )


def test_the_request_carries_the_changed_ranges_of_a_full_check_only() -> None:
    size = 1 << 20
    assert plans_for(_request(None), disk_size=size, allocated=[]).full_check is None
    assert plans_for(_request([]), disk_size=size, allocated=[]).full_check == []
    plans = plans_for(_request([(4096, 10)]), disk_size=size, allocated=[Extent(0, size)])
    assert plans.full_check == [Extent(4096, 10)] and plans.first.read == [Extent(0, size)]
    with pytest.raises(InvalidArgument, match=r"full_check\.ranges\[0\]"):
        plans_for(_request([(size - 1, 2)]), disk_size=size, allocated=[])
