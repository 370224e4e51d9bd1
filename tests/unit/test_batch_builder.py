"""BatchBuilder against a source disk in memory: what it reads, skips and sends, checked by decoding its
frames with the target's decoder."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from proxy_agent.pipeline import BatchBuilder, built_batches
from proxy_agent.plan import make_plan, plan_batches
from tests.datapath_fakes import MemoryReader, block_digests
from vmrepl.batch import MAX_EXTENTS, BatchDecoder, PassDigest
from vmrepl.block import UNKNOWN_DIGEST
from vmrepl.domain import Compression
from vmrepl.extent import Extent

BS = 64 * 1024
TEXT = (b"blocks into batches " * 4000)[:BS]
SOURCE = os.urandom(BS) + TEXT + bytes(BS) + os.urandom(BS) + TEXT + TEXT[: BS // 2]  # a short last block


def replay(
    builder: BatchBuilder, *, allocated: list[Extent], batch_bytes: int = 2 * BS
) -> tuple[bytearray, dict[str, int]]:
    """Build every batch of a full plan, decode each as the target would, and apply it to a zeroed replica."""
    size = len(SOURCE)
    plan = make_plan(disk_size=size, block_size=BS, allocated=allocated, changed=None, excluded=[])
    out = bytearray(b"\xee" * size)  # not zero: zero extents must really be written
    dec = BatchDecoder(disk_size=size, block_size=BS, start=0)
    counts = {"data": 0, "zero": 0, "unchanged": 0, "read": 0, "batches": 0}
    proxy_digest = target_digest = PassDigest()
    for seq, pb in enumerate(plan_batches(plan, start=0, batch_bytes=batch_bytes, max_items=MAX_EXTENTS)):
        b = builder.build(pb, seq)
        got = dec.receive(b.frame).decode()
        for e in got.extents:
            out[e.offset : e.offset + e.length] = bytes(e.length) if e.data is None else e.data
        proxy_digest, target_digest = proxy_digest.merge(b.digest), target_digest.merge(got.digest)
        counts["data"] += b.data_bytes
        counts["zero"] += b.zero_bytes
        counts["unchanged"] += b.unchanged_bytes
        counts["read"] += b.read_bytes
        counts["batches"] += 1
    assert proxy_digest == target_digest
    return out, counts


def test_a_full_build_reproduces_the_disk() -> None:
    builder = BatchBuilder(MemoryReader(SOURCE), block_size=BS, compression=Compression.DEFAULT)
    out, counts = replay(builder, allocated=[Extent(0, len(SOURCE))])
    assert out == SOURCE
    assert counts["data"] == 4 * BS + BS // 2 and counts["zero"] == BS and counts["read"] == len(SOURCE)


def test_unallocated_ranges_travel_as_zero_extents_without_a_read() -> None:
    data = bytearray(SOURCE)
    data[3 * BS : 4 * BS] = bytes(BS)  # unallocated reads as zeros
    builder = BatchBuilder(MemoryReader(data), block_size=BS, compression=Compression.NONE)
    out, counts = replay(builder, allocated=[Extent(0, 3 * BS), Extent(4 * BS, len(SOURCE) - 4 * BS)])
    assert out == data and counts["read"] == len(SOURCE) - BS


def test_blocks_equal_to_the_replica_are_not_sent() -> None:
    table = bytearray(block_digests(SOURCE, BS))
    table[16:32] = UNKNOWN_DIGEST  # block 1 unknown at the target: it must travel
    builder = BatchBuilder(
        MemoryReader(SOURCE), block_size=BS, compression=Compression.FAST, replica_digests=bytes(table)
    )
    _, counts = replay(builder, allocated=[Extent(0, len(SOURCE))])
    assert counts["data"] == BS and counts["unchanged"] == 3 * BS + BS // 2


async def test_batches_are_built_ahead_in_threads_and_yielded_in_order() -> None:
    builder = BatchBuilder(MemoryReader(SOURCE), block_size=BS, compression=Compression.FAST)
    plan = make_plan(
        disk_size=len(SOURCE), block_size=BS, allocated=[Extent(0, len(SOURCE))], changed=None, excluded=[]
    )
    planned = plan_batches(plan, start=0, batch_bytes=BS, max_items=MAX_EXTENTS)
    with ThreadPoolExecutor(2) as pool:
        seqs = [b.seq async for b in built_batches(builder, planned, executor=pool, depth=3)]
    assert seqs == list(range(len(seqs))) and len(seqs) >= 5
