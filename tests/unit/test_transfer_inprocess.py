"""DiskTransfer against an in-process fake target (tests/datapath_fakes.py): the paths that otherwise only
real processes exercise, in milliseconds each: a refusing target, a broken stream resumed, a pass re-run as
a digest comparison after a failed sample, a pass digest that differs."""

from __future__ import annotations

import os

import grpc
from tenacity import wait_none

from proxy_agent import stats as st
from proxy_agent.plan import Plan, make_plan
from proxy_agent.transfer import DiskTransfer, TransferSpec
from tests.datapath_fakes import FakeTarget, MemoryReader
from vmrepl.domain import ChangeMode, Compression
from vmrepl.extent import Extent

BS = 64 * 1024
BLOCKS = 24
TEXT = (b"the replica must equal the source " * 2000)[:BS]


def source_bytes() -> bytearray:
    """Random, compressible and zero blocks."""
    out = bytearray()
    for i in range(BLOCKS):
        out += os.urandom(BS) if i % 3 == 0 else TEXT if i % 3 == 1 else bytes(BS)
    return out


def plan_of(size: int, changed: list[Extent] | None = None) -> Plan:
    return make_plan(disk_size=size, block_size=BS, allocated=[Extent(0, size)], changed=changed, excluded=[])


def transfer(
    source: bytearray,
    target: FakeTarget,
    *,
    mode: ChangeMode = ChangeMode.FULL,
    changed: list[Extent] | None = None,
    full_check: list[Extent] | None = None,
) -> DiskTransfer:
    spec = TransferSpec(
        transfer_id="t1",
        session_id="s1",
        checkpoint_id="cp1",
        disk_id="disk0",
        replica_path="jobs/vm1",
        ticket=b"ticket",
        block_size=BS,
        mode=mode,
        compression=Compression.FAST,
        bandwidth_bytes_per_s=0,
        resume_timeout=30,
        batch_bytes=2 * BS,  # several batches per disk
        window=4,
        threads=2,
        full_check=tuple(full_check) if full_check is not None else None,
    )
    return DiskTransfer(
        spec=spec,
        plan=plan_of(len(source), changed),
        full_plan=lambda: plan_of(len(source)),
        reader=MemoryReader(source),
        link_factory=lambda: target,
        retry_wait=wait_none(),
    )


async def run(t: DiskTransfer) -> st.TransferStats:
    t.start()
    assert t.task is not None
    await t.task
    return t.stats


async def test_a_full_transfer_makes_the_replica_equal_to_the_source() -> None:
    source = source_bytes()
    target = FakeTarget(bytearray(len(source)), BS)
    stats = await run(transfer(source, target))
    assert (stats.state, stats.resumes, stats.passes) == (st.COMPLETED, 0, 1), stats.error_message
    assert target.replica == source and target.closed
    assert stats.committed_offset == len(source) and list(target.opens[0].protocol_versions) == [1]


async def test_a_refusing_target_fails_the_transfer_at_once_with_its_reason() -> None:
    source = source_bytes()
    target = FakeTarget(bytearray(len(source)), BS, refuse=("PERMISSION_DENIED", "ticket expired"))
    stats = await run(transfer(source, target))
    assert (stats.state, stats.error_code, stats.error_message) == (st.FAILED, "PERMISSION_DENIED", "ticket expired")
    assert len(target.opens) == 1 and stats.resumes == 0  # a permanent refusal is not retried


async def test_a_target_of_another_protocol_version_is_refused_clearly() -> None:
    source = source_bytes()
    target = FakeTarget(bytearray(len(source)), BS, speaks=(2,))
    stats = await run(transfer(source, target))
    assert (stats.state, stats.error_code) == (st.FAILED, "FAILED_PRECONDITION")
    assert "proxy speaks Transfer protocol version(s) 1, this target speaks 2" in stats.error_message
    # And the proxy's own check of the answer: a target answering a version the proxy never offered.
    odd = FakeTarget(bytearray(len(source)), BS, answer_version=4)
    stats = await run(transfer(source, odd))
    assert (
        stats.error_code == "FAILED_PRECONDITION" and "target chose Transfer protocol version 4" in stats.error_message
    )
    assert odd.batches == 0


async def test_a_stream_broken_midway_resumes_from_the_committed_offset() -> None:
    source = source_bytes()
    target = FakeTarget(bytearray(len(source)), BS, break_after=[3, 2])
    stats = await run(transfer(source, target))
    assert (stats.state, stats.resumes) == (st.COMPLETED, 2), stats.error_message
    assert target.replica == source
    assert target.resumed == [0, 3 * 2 * BS, 5 * 2 * BS]  # each stream went on from the last committed batch
    assert target.batches == BLOCKS // 2  # nothing committed was sent again


async def test_a_failed_sample_re_runs_the_disk_as_a_digest_comparison() -> None:
    """The change tracking missed a write (block 5): the changed-range pass cannot see it, the sample
    catches it, and pass 1 compares digests and sends exactly what differs."""
    source = source_bytes()
    replica = bytearray(source)
    replica[5 * BS : 6 * BS] = os.urandom(BS)  # a write the change tracking lost (the sample's first blocks)
    replica[0:BS] = b"x" * BS  # and one the tracking reported
    target = FakeTarget(replica, BS)
    stats = await run(transfer(source, target, mode=ChangeMode.RANGES, changed=[Extent(0, BS)]))
    assert (stats.state, stats.passes) == (st.COMPLETED, 2), stats.error_message
    assert 0 < stats.mismatched_blocks <= stats.sampled_blocks
    assert [o.pass_number for o in target.opens] == [0, 1]
    assert target.replica == source


async def test_a_passing_sample_keeps_one_pass() -> None:
    source = source_bytes()
    replica = bytearray(source)
    replica[0:BS] = b"x" * BS  # the only change, and the tracking reported it
    target = FakeTarget(replica, BS)
    stats = await run(transfer(source, target, mode=ChangeMode.RANGES, changed=[Extent(0, BS)]))
    assert (stats.state, stats.passes) == (st.COMPLETED, 1), stats.error_message
    assert (stats.sampled_blocks > 0, stats.mismatched_blocks) == (True, 0) and target.replica == source


async def test_a_sample_whose_digest_read_is_refused_for_a_moment_asks_again() -> None:
    """A target busy with as many digest reads as it takes (RESOURCE_EXHAUSTED), or restarting
    (UNAVAILABLE), is asked again for the sample's digests, as stream attempts are; the sample then runs."""
    source = source_bytes()
    replica = bytearray(source)
    replica[0:BS] = b"x" * BS
    target = FakeTarget(replica, BS)
    target.digest_faults = [grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE]
    stats = await run(transfer(source, target, mode=ChangeMode.RANGES, changed=[Extent(0, BS)]))
    assert (stats.state, stats.passes, target.digest_reads) == (st.COMPLETED, 1, 3), stats.error_message
    assert stats.sampled_blocks > 0 and target.replica == source


async def test_a_digest_comparison_sends_only_what_differs() -> None:
    source = source_bytes()
    replica = bytearray(source)
    replica[7 * BS : 8 * BS] = os.urandom(BS)
    target = FakeTarget(replica, BS)
    stats = await run(transfer(source, target, mode=ChangeMode.COMPARE))
    assert stats.state == st.COMPLETED and target.replica == source
    assert stats.bytes_data == BS and stats.unchanged == len(source) - BS - stats.zero


async def test_a_pass_digest_that_differs_fails_the_disk() -> None:
    source = source_bytes()
    target = FakeTarget(bytearray(len(source)), BS, corrupt_digest=True)
    stats = await run(transfer(source, target))
    assert (stats.state, stats.error_code) == (st.FAILED, "DATA_LOSS")
    assert "end of disk" in stats.error_message


async def test_a_stop_before_the_first_stream_ends_cancelled() -> None:
    source = source_bytes()
    target = FakeTarget(bytearray(len(source)), BS)
    t = transfer(source, target)
    t.stop()
    stats = await run(t)
    assert (stats.state, stats.error_code, target.batches) == (st.CANCELLED, "CANCELLED", 0)


async def test_a_full_check_names_the_blocks_the_change_tracking_missed() -> None:
    """A full check compares every block; of those that differ, the ones outside the host's changed ranges
    (blocks 7 and 8, 19) were missed by the change tracking and are reported as repaired, by offset; the
    tracked one (block 1) is an ordinary change. Broken streams resume without counting a block twice."""
    source = source_bytes()
    replica = bytearray(source)
    for block in (1, 7, 8, 19):
        replica[block * BS : (block + 1) * BS] = os.urandom(BS)
    target = FakeTarget(replica, BS, break_after=[2, 3])
    stats = await run(transfer(source, target, mode=ChangeMode.COMPARE, full_check=[Extent(BS + 10, 100)]))
    assert (stats.state, stats.resumes) == (st.COMPLETED, 2), stats.error_message
    assert target.replica == source
    found = stats.to_proto().full_check
    assert (found.differed_blocks, found.repaired_blocks) == (4, 3)
    assert [(r.offset, r.length) for r in found.repaired_ranges] == [(7 * BS, 2 * BS), (19 * BS, BS)]


async def test_an_ordinary_comparison_reports_no_full_check() -> None:
    source = source_bytes()
    replica = bytearray(source)
    replica[7 * BS : 8 * BS] = os.urandom(BS)
    target = FakeTarget(replica, BS)
    stats = await run(transfer(source, target, mode=ChangeMode.COMPARE))
    assert stats.state == st.COMPLETED and not stats.to_proto().HasField("full_check")
