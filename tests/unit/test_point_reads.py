"""The target's VerifyReplica and ReadReplicaDisk with the real servicer in process (a fake gRPC context, a
committed restore point in a temporary directory): corruption found at its offset, samples, unknown
digests, a sparse export equal to the replica, bounds, bad requests, and a session preparing the disk
while it is read."""

from __future__ import annotations

import asyncio
import itertools
import random
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from controller.cli.export_file import write_export
from target_agent import export, point_reads, replica, verify
from target_agent.point_reads import PointReads
from target_agent.servicer import TargetAgentServicer
from tests.support.points import (
    BS,
    REPLICA_PATH,
    Aborted,
    FakeContext,
    commit_disk,
    data_file,
    disk_bytes,
    overwrite,
    servicer,
)
from tests.support.replicas import qemu_identical
from vmrepl.disk.raw import RawReader
from vmrepl.errors import FailedPrecondition
from vmrepl.extent import MiB
from vmrepl.security import certs
from vmrepl.v1 import common_pb2, target_pb2

BLOCKS = 40
TAIL = 1000  # the disk's last block is short


@pytest.fixture(scope="module")
def pems(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("certs")
    certs.create_ca(d)
    for name in ("ctl-a", "ctl-b", "ctl-c"):
        certs.issue(d, name=name, role="controller", hosts=["localhost"])
    return {name: (d / f"{name}.pem").read_bytes() for name in ("ctl-a", "ctl-b", "ctl-c")}


def verify_request(point: str = "", percent: int = 0, disks: tuple[str, ...] = ()) -> target_pb2.VerifyReplicaRequest:
    return target_pb2.VerifyReplicaRequest(
        replica_path=REPLICA_PATH, restore_point_id=point, sample_percent=percent, disk_ids=disks
    )


async def run_verify(s: TargetAgentServicer, pem: bytes, **request: Any) -> list[common_pb2.VerifyProgress]:
    return [m async for m in s.VerifyReplica(verify_request(**request), FakeContext(pem))]


def mismatches(messages: list[common_pb2.VerifyProgress]) -> list[tuple[int, int]]:
    return [(r.offset, r.length) for m in messages for r in m.mismatches]


async def test_a_planted_corruption_is_found_at_its_offset_and_nothing_else(
    tmp_path: Path, pems: dict[str, bytes]
) -> None:
    s = servicer(tmp_path)
    point = commit_disk(s, disk_bytes(BLOCKS, tail=TAIL))
    clean = await run_verify(s, pems["ctl-a"])
    assert clean[-1].done and clean[-1].mismatch_count == 0 and clean[-1].blocks_checked == BLOCKS + 1
    assert clean[-1].blocks_total == BLOCKS + 1 and clean[-1].block_size == BS and clean[-1].blocks_unknown == 0

    overwrite(data_file(s), 17 * BS + 123, b"\xff")  # one byte of a data block
    overwrite(data_file(s), BLOCKS * BS + 10, b"\x01")  # the short last block
    overwrite(data_file(s), 20 * BS + 5, b"\x02")  # block 20 is a hole: written behind the digests' back
    found = await run_verify(s, pems["ctl-a"], point=point.id)
    assert mismatches(found) == [(17 * BS, BS), (20 * BS, BS), (BLOCKS * BS, TAIL)]
    assert [m.done for m in found] == [False] * (len(found) - 1) + [True]
    assert found[-1].mismatch_count == 3 and found[-1].disk_id == "disk0"


async def test_a_block_whose_data_was_punched_away_is_a_mismatch(tmp_path: Path, pems: dict[str, bytes]) -> None:
    s = servicer(tmp_path)
    commit_disk(s, disk_bytes(BLOCKS))
    with open(data_file(s), "r+b") as f:  # block 3 (random data) now reads as zeros: a hole is no pass
        f.seek(3 * BS)
        f.write(bytes(BS))
    assert mismatches(await run_verify(s, pems["ctl-a"])) == [(3 * BS, BS)]


async def test_a_sample_checks_its_share_rounded_up_at_random(tmp_path: Path, pems: dict[str, bytes]) -> None:
    s = servicer(tmp_path)
    data = disk_bytes(BLOCKS, tail=TAIL, zero_every=1000)
    commit_disk(s, data)
    overwrite(data_file(s), 0, bytes(b ^ 0x5A for b in data))  # every block differs: each checked one is found
    seen = set()
    for seed in (1, 2, 3):
        s.rng = random.Random(seed)
        last = (await run_verify(s, pems["ctl-a"], percent=10))[-1]
        assert last.blocks_total == last.blocks_checked == last.mismatch_count == 5  # 10% of 41, rounded up
        seen.add(tuple(r.offset for r in last.mismatches))
    assert len(seen) > 1, "the sample is chosen at random"
    assert (await run_verify(s, pems["ctl-a"], percent=1))[-1].blocks_checked == 1
    assert (await run_verify(s, pems["ctl-a"], percent=100))[-1].mismatch_count == BLOCKS + 1


def test_selection_is_exact_sorted_and_covers_the_disk() -> None:
    rng = random.Random(7)
    hits = [0] * 50
    for _ in range(400):
        chosen = list(verify.selection(50, 5, rng))
        assert len(chosen) == 5 and chosen == sorted(set(chosen))
        for b in chosen:
            hits[b] += 1
    assert min(hits) > 10, "every block gets chosen now and then"
    assert verify.sample_size(1, 1) == 1 and verify.sample_size(1000, 1) == 10 and verify.sample_size(0, 50) == 0


async def test_unknown_digests_are_counted_not_called_mismatches(tmp_path: Path, pems: dict[str, bytes]) -> None:
    s = servicer(tmp_path)
    commit_disk(s, disk_bytes(BLOCKS))
    disk = s.datastore.disk_dir(REPLICA_PATH, "disk0")
    store = replica.DigestStore(disk / replica.DIGESTS_FILE, block_size=BS, disk_size=BLOCKS * BS)
    store.forget(3 * BS, 6 * BS)  # blocks 3, 4, 5: as a crash leaves them
    store.close()
    overwrite(data_file(s), 4 * BS, b"\x99" * 10)  # the block cannot be vouched for, nor condemned
    last = (await run_verify(s, pems["ctl-a"]))[-1]
    assert (last.blocks_unknown, last.mismatch_count, last.blocks_checked) == (3, 0, BLOCKS)


async def test_progress_comes_each_interval_and_many_mismatches_split_into_messages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = servicer(tmp_path)
    blocks = 3 * verify.READ_BYTES // BS  # three reads
    commit_disk(s, disk_bytes(blocks, zero_every=1000))
    for b in (1, 2, 3, 70, 150):
        overwrite(data_file(s), b * BS, b"\x00\x01")
    monkeypatch.setattr(verify, "MAX_RANGES_PER_MESSAGE", 2)
    vm_dir = s.datastore.vm_dir(REPLICA_PATH)
    kw: dict[str, Any] = {"point_id": "", "disk_ids": [], "percent": 100, "executor": s.disk_reads}
    messages = [m async for m in verify.verify_point(vm_dir, rng=random.Random(), every=0.0, **kw)]
    assert all(len(m.mismatches) <= 2 for m in messages)
    assert mismatches(messages) == [(b * BS, BS) for b in (1, 2, 3, 70, 150)]
    assert [m.blocks_checked for m in messages] == sorted(m.blocks_checked for m in messages)
    assert len(messages) >= 4 and messages[-1].done and sum(m.done for m in messages) == 1

    quiet = [m async for m in verify.verify_point(vm_dir, rng=random.Random(), every=3600.0, **kw)]
    assert len(quiet) == 3 and quiet[-1].mismatch_count == 5  # splits only: 5 ranges, 2 per message


async def test_the_export_is_the_replica_byte_for_byte_and_sparse(tmp_path: Path, pems: dict[str, bytes]) -> None:
    s = servicer(tmp_path)
    data = disk_bytes(200, tail=TAIL, zero_every=3)  # over 12 MiB: several chunks; a third of it zeros
    point = commit_disk(s, data)
    request = target_pb2.ReadReplicaDiskRequest(replica_path=REPLICA_PATH, restore_point_id=point.id, disk_id="disk0")
    chunks = [c async for c in s.ReadReplicaDisk(request, FakeContext(pems["ctl-a"]))]
    assert chunks[-1].done and not chunks[-1].data and all(not c.done for c in chunks[:-1])
    assert all(c.disk_size == len(data) for c in chunks)
    assert all(0 < len(c.data) <= export.CHUNK_BYTES < 4 * MiB for c in chunks[:-1])
    ends = [(c.offset, c.offset + len(c.data)) for c in chunks[:-1]]
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(ends)), "offset order, no overlap"
    sent = sum(len(c.data) for c in chunks)
    assert sent == len(data) - data.count(bytes(BS)) * BS < len(data)  # zero blocks are not sent

    out = tmp_path / "export.raw"
    assert write_export(iter(chunks), out) == len(data)
    assert out.read_bytes() == data
    assert qemu_identical(out, data_file(s))
    assert out.stat().st_blocks * 512 < len(data), "the export is sparse"


async def test_zeros_written_inside_allocated_ranges_are_not_sent_either(
    tmp_path: Path, pems: dict[str, bytes]
) -> None:
    s = servicer(tmp_path)
    data = disk_bytes(100, zero_every=4)
    point = commit_disk(s, data, zeros_written=True)  # one allocated range: the zero blocks are written zeros
    with RawReader(data_file(s)) as r:
        assert [(e.offset, e.length) for e in r.allocated_extents()] == [(0, len(data))]
    request = target_pb2.ReadReplicaDiskRequest(replica_path=REPLICA_PATH, restore_point_id=point.id, disk_id="disk0")
    chunks = [c async for c in s.ReadReplicaDisk(request, FakeContext(pems["ctl-a"]))]
    assert sum(len(c.data) for c in chunks) == 75 * BS
    out = tmp_path / "export.raw"
    write_export(iter(chunks), out)
    assert out.read_bytes() == data


async def test_a_point_without_data_exports_as_only_a_done_message(tmp_path: Path, pems: dict[str, bytes]) -> None:
    s = servicer(tmp_path)
    point = commit_disk(s, bytes(4 * BS))
    request = target_pb2.ReadReplicaDiskRequest(replica_path=REPLICA_PATH, restore_point_id=point.id, disk_id="disk0")
    chunks = [c async for c in s.ReadReplicaDisk(request, FakeContext(pems["ctl-a"]))]
    assert chunks == [common_pb2.DiskChunk(disk_size=4 * BS, done=True)]


BAD_VERIFY: list[tuple[dict[str, Any], str]] = [
    ({"replica_path": "../vm1"}, "replica_path"),
    ({"replica_path": "/etc"}, "replica_path"),
    ({"restore_point_id": "../../etc"}, "restore_point_id"),
    ({"restore_point_id": "a/b"}, "restore_point_id"),
    ({"disk_ids": ["../disk0"]}, "disk_ids"),
    ({"disk_ids": ["disk0", "disk0"]}, "disk_ids"),
    ({"sample_percent": 101}, "sample_percent"),
    ({"sample_percent": 2**32 - 1}, "sample_percent"),
]
BAD_READ: list[tuple[dict[str, Any], str]] = [
    ({"restore_point_id": ""}, "restore_point_id"),
    ({"restore_point_id": ".."}, "restore_point_id"),
    ({"disk_id": "../../data"}, "disk_id"),
    ({"disk_id": ""}, "disk_id"),
    ({"replica_path": "jobs/../../x"}, "replica_path"),
]


@pytest.mark.parametrize(("fields", "named"), BAD_VERIFY + BAD_READ)
async def test_a_bad_request_is_invalid_argument_naming_its_field_before_any_slot_or_read(
    tmp_path: Path, pems: dict[str, bytes], fields: dict[str, Any], named: str
) -> None:
    s = servicer(tmp_path)
    point = commit_disk(s, disk_bytes(4))
    if (fields, named) in BAD_VERIFY:
        call: AsyncIterator[Any] = s.VerifyReplica(
            target_pb2.VerifyReplicaRequest(**{"replica_path": REPLICA_PATH, **fields}), FakeContext(pems["ctl-a"])
        )
    else:
        base = {"replica_path": REPLICA_PATH, "restore_point_id": point.id, "disk_id": "disk0"}
        call = s.ReadReplicaDisk(target_pb2.ReadReplicaDiskRequest(**{**base, **fields}), FakeContext(pems["ctl-a"]))
    with pytest.raises(Aborted) as e:
        await anext(aiter(call))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.details.startswith(f"{named}:")
    assert s.disk_read_slots.in_use == 0


async def test_an_unknown_point_or_disk_is_not_found(tmp_path: Path, pems: dict[str, bytes]) -> None:
    s = servicer(tmp_path)
    point = commit_disk(s, disk_bytes(4))
    ctx = FakeContext(pems["ctl-a"])
    calls = [
        s.VerifyReplica(verify_request(point="nope"), ctx),
        s.VerifyReplica(verify_request(disks=("disk0", "disk9")), ctx),  # refused before disk0 is read
        s.VerifyReplica(target_pb2.VerifyReplicaRequest(replica_path="jobs/vm2"), ctx),
        s.ReadReplicaDisk(
            target_pb2.ReadReplicaDiskRequest(replica_path=REPLICA_PATH, restore_point_id="nope", disk_id="disk0"), ctx
        ),
        s.ReadReplicaDisk(
            target_pb2.ReadReplicaDiskRequest(replica_path=REPLICA_PATH, restore_point_id=point.id, disk_id="d9"), ctx
        ),
    ]
    for call in calls:
        with pytest.raises(Aborted) as e:
            async for m in call:
                raise AssertionError(f"answered {m} before refusing")
        assert e.value.code == grpc.StatusCode.NOT_FOUND, e.value.details
    assert s.disk_read_slots.in_use == 0


async def test_calls_past_the_limit_per_caller_and_in_total_are_refused(
    tmp_path: Path, pems: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    closed: list[PointReads] = []
    real_close = PointReads.close

    def spy_close(self: PointReads) -> None:
        closed.append(self)
        real_close(self)

    monkeypatch.setattr(PointReads, "close", spy_close)
    s = servicer(tmp_path, max_disk_reads_per_peer=1, max_disk_reads=2)
    point = commit_disk(s, disk_bytes(200, zero_every=1000))
    request = target_pb2.ReadReplicaDiskRequest(replica_path=REPLICA_PATH, restore_point_id=point.id, disk_id="disk0")
    held = []
    for peer in ("ctl-a", "ctl-b"):  # each export holds its slot while suspended at its first chunk
        call = aiter(s.ReadReplicaDisk(request, FakeContext(pems[peer])))
        assert (await anext(call)).data
        held.append(call)
    with pytest.raises(Aborted, match="'ctl-a' already has 1 VerifyReplica and ReadReplicaDisk calls open") as a:
        await anext(aiter(s.VerifyReplica(verify_request(), FakeContext(pems["ctl-a"]))))
    with pytest.raises(Aborted, match="2 VerifyReplica and ReadReplicaDisk calls are open") as c:
        await anext(aiter(s.ReadReplicaDisk(request, FakeContext(pems["ctl-c"]))))
    assert a.value.code == c.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    for call in held:
        await call.aclose()  # type: ignore[attr-defined]
    assert s.disk_read_slots.in_use == 0
    assert len(closed) == 2, "a caller gone lets go of its disk at once, not when the garbage is collected"
    assert (await run_verify(s, pems["ctl-c"]))[-1].done


async def test_a_session_preparing_the_disk_mid_read_voids_the_export_and_the_verification(
    tmp_path: Path, pems: dict[str, bytes]
) -> None:
    s = servicer(tmp_path)
    point = commit_disk(s, disk_bytes(200, zero_every=1000))
    request = target_pb2.ReadReplicaDiskRequest(replica_path=REPLICA_PATH, restore_point_id=point.id, disk_id="disk0")
    call = aiter(s.ReadReplicaDisk(request, FakeContext(pems["ctl-a"])))
    await anext(call)
    disk = s.datastore.disk_dir(REPLICA_PATH, "disk0")
    guard = s.receiver.guard(disk)
    replica.prepare(disk, guard=guard, disk_size=200 * BS, block_size=BS, session_id="s2", checkpoint_id="cp-s2")
    with pytest.raises(Aborted) as e:
        async for chunk in call:
            assert not chunk.done, "no export of a disk a session prepared meanwhile is called complete"
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "session s2" in e.value.details

    s2 = servicer(tmp_path / "again")
    commit_disk(s2, disk_bytes(200, zero_every=1000))
    vm_dir = s2.datastore.vm_dir(REPLICA_PATH)
    kw: dict[str, Any] = {"point_id": "", "disk_ids": [], "percent": 100, "executor": s2.disk_reads}
    progress = aiter(verify.verify_point(vm_dir, rng=random.Random(), every=0.0, **kw))
    assert not (await anext(progress)).done
    disk2 = s2.datastore.disk_dir(REPLICA_PATH, "disk0")
    replica.prepare(
        disk2, guard=s2.receiver.guard(disk2), disk_size=200 * BS, block_size=BS, session_id="s3", checkpoint_id="c"
    )
    with pytest.raises(FailedPrecondition, match="session s3"):
        async for m in progress:
            assert not m.done


class SlowDisk:
    """A PointDisk stand-in whose reads wait for the test, and which counts its closes."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.closed = 0
        self.closed_event = threading.Event()
        self.reads_running = 0

    def close(self) -> None:
        assert self.reads_running == 0, "closed under a running read"
        self.closed += 1
        self.closed_event.set()


def slow_read(disk: Any, buf: bytearray, item: int) -> int:
    disk.reads_running += 1
    disk.started.set()
    disk.release.wait(10)
    disk.reads_running -= 1
    return item


async def test_a_caller_gone_mid_read_closes_the_disk_once_its_reads_end(tmp_path: Path) -> None:
    s = servicer(tmp_path)
    disk = SlowDisk()
    reads = PointReads(disk, s.disk_reads, buffer_bytes=16)  # type: ignore[arg-type]
    results = reads.ordered(range(10), slow_read)
    first = asyncio.ensure_future(anext(results))
    await asyncio.to_thread(disk.started.wait, 10)
    first.cancel()  # the caller goes away while two reads run in the pool
    with pytest.raises(asyncio.CancelledError):
        await first
    await results.aclose()  # type: ignore[attr-defined]
    reads.close()
    assert disk.closed == 0, "not while its reads run"
    disk.release.set()
    assert await asyncio.to_thread(disk.closed_event.wait, 10)
    assert disk.closed == 1


async def test_a_caller_gone_while_the_disk_opens_leaves_nothing_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = servicer(tmp_path)
    disk = SlowDisk()

    def slow_open(*_args: Any) -> SlowDisk:
        disk.started.set()
        disk.release.wait(10)
        return disk

    monkeypatch.setattr(point_reads, "open_point_disk", slow_open)
    opening = asyncio.ensure_future(
        point_reads.open_reads(tmp_path, "p", "disk0", s.disk_reads, buffer_bytes=lambda _d: 16)
    )
    await asyncio.to_thread(disk.started.wait, 10)
    opening.cancel()
    with pytest.raises(asyncio.CancelledError):
        await opening
    assert disk.closed == 0
    disk.release.set()  # the open ends in its thread after the caller left: what it opened is closed
    assert await asyncio.to_thread(disk.closed_event.wait, 10)
