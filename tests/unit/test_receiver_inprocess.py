"""The target's Receiver and CommitPipeline in process: a fake gRPC context, frames from tests/frames.py,
the replica in a temporary directory. A refusing target, a proxy of another protocol version, and a commit
that fails, each in milliseconds."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from target_agent import replica
from target_agent.commit_pipeline import CommitPipeline, Queued
from target_agent.datastore import Datastore
from target_agent.receiver import Receiver
from target_agent.replica import COMPLETE, RECEIVING, CommitPoint, DiskState
from tests import frames
from vmrepl.batch import BatchDecoder, DecodedBatch, PassDigest
from vmrepl.call_limits import Slots
from vmrepl.errors import DiskError, FailedPrecondition, TicketError
from vmrepl.security import certs
from vmrepl.security.ticket import key_id
from vmrepl.v1 import target_pb2

BS = 64 * 1024
SIZE = 8 * BS
BLOCKS = [bytes([i + 1]) * BS for i in range(8)]


class FakeContext:
    def __init__(self, pem: bytes) -> None:
        self.pem = pem
        self.written: list[target_pb2.TransferResponse] = []

    def auth_context(self) -> Mapping[str, Sequence[bytes]]:
        return {"x509_pem_cert": [self.pem]}

    async def write(self, message: target_pb2.TransferResponse) -> None:
        self.written.append(message)


@pytest.fixture(scope="module")
def proxy_pem(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    d = tmp_path_factory.mktemp("certs")
    certs.create_ca(d)
    certs.issue(d, name="proxy", role="proxy", hosts=["localhost"])
    return (d / "proxy.pem").read_bytes()


KEY = ed25519.Ed25519PrivateKey.generate()


def receiver(root: Path) -> Receiver:
    return Receiver(
        datastore=Datastore(root),
        keys={key_id(KEY.public_key()): KEY.public_key()},
        name="target",
        max_window=64,
        guards={},
        slots=Slots(per_peer=2, total=4, what="Transfer streams"),
        open_timeout=5,
        idle_timeout=5,
    )


def opening(*, versions: tuple[int, ...] = (1,), proxy: str = "proxy") -> bytes:
    return frames.signed_open(
        KEY,
        session_id="s1",
        checkpoint_id="cp1",
        replica_path="jobs/vm1",
        disk_size=SIZE,
        block_size=BS,
        proxy=proxy,
        protocol_versions=versions,
    )


def prepared(root: Path, r: Receiver) -> Path:
    disk = Datastore(root).disk_dir("jobs/vm1", "disk0")
    replica.prepare(disk, guard=r.guard(disk), disk_size=SIZE, block_size=BS, session_id="s1", checkpoint_id="cp1")
    return disk


async def stream(items: list[bytes]) -> AsyncIterator[bytes]:
    for i in items:
        yield i


def whole_disk() -> list[bytes]:
    return [frames.data_batch(i, i * 2 * BS, BLOCKS[2 * i : 2 * i + 2], final=i == 3) for i in range(4)]


async def test_a_stream_is_written_committed_and_acknowledged(tmp_path: Path, proxy_pem: bytes) -> None:
    r = receiver(tmp_path)
    disk = prepared(tmp_path, r)
    ctx = FakeContext(proxy_pem)
    await r.run(stream([opening(), *whole_disk()]), ctx)
    accept, *acks = ctx.written
    assert accept.accept.protocol_version == 1 and accept.accept.resume_offset == 0
    assert [a.ack.committed_offset for a in acks] == [4 * BS, SIZE] and acks[-1].ack.complete
    sent = PassDigest()
    for i in range(4):
        sent = sent.merge(frames.encoded(i, i * 2 * BS, BLOCKS[2 * i : 2 * i + 2], final=i == 3).digest)
    assert PassDigest.from_wire(acks[-1].ack.session_digest) == sent
    assert (disk / replica.DATA_FILE).read_bytes() == b"".join(BLOCKS)
    assert replica.load_state(disk).state == COMPLETE


async def test_an_open_without_versions_is_version_1(tmp_path: Path, proxy_pem: bytes) -> None:
    r = receiver(tmp_path)
    prepared(tmp_path, r)
    ctx = FakeContext(proxy_pem)
    await r.run(stream([opening(versions=())]), ctx)  # a proxy from before versions; it then half-closes
    assert ctx.written[0].accept.protocol_version == 1


async def test_a_proxy_of_another_protocol_version_is_refused(tmp_path: Path, proxy_pem: bytes) -> None:
    r = receiver(tmp_path)
    disk = prepared(tmp_path, r)
    before = (disk / replica.STATE_FILE).read_bytes()
    ctx = FakeContext(proxy_pem)
    with pytest.raises(FailedPrecondition):
        await r.run(stream([opening(versions=(7,)), *whole_disk()]), ctx)
    (only,) = ctx.written
    assert only.error.code == "FAILED_PRECONDITION"
    assert only.error.message == (
        "the proxy speaks Transfer protocol version(s) 7, this target speaks 1: upgrade the older of the two agents"
    )
    assert (disk / replica.STATE_FILE).read_bytes() == before


async def test_a_ticket_for_another_proxy_is_refused_in_band(tmp_path: Path, proxy_pem: bytes) -> None:
    r = receiver(tmp_path)
    prepared(tmp_path, r)
    ctx = FakeContext(proxy_pem)
    with pytest.raises(TicketError):
        await r.run(stream([opening(proxy="proxy-elsewhere")]), ctx)
    assert (
        ctx.written[0].error.code == "PERMISSION_DENIED"
        and "not for certificate 'proxy'" in ctx.written[0].error.message
    )


async def test_a_failing_commit_ends_the_stream_and_acknowledges_nothing_past_it(
    tmp_path: Path, proxy_pem: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = receiver(tmp_path)
    disk = prepared(tmp_path, r)
    real = replica.ReplicaStream.commit
    commits: list[int] = []

    def failing(self: replica.ReplicaStream, point: CommitPoint) -> DiskState:
        commits.append(point.offset)
        if len(commits) == 2:
            raise DiskError("fdatasync failed: no space left on the device")
        return real(self, point)

    monkeypatch.setattr(replica.ReplicaStream, "commit", failing)
    ctx = FakeContext(proxy_pem)
    with pytest.raises(DiskError):
        await r.run(stream([opening(), *whole_disk()]), ctx)
    acks = [m.ack for m in ctx.written if m.HasField("ack")]
    assert [a.committed_offset for a in acks] == [4 * BS]
    assert ctx.written[-1].error.message == "fdatasync failed: no space left on the device"
    st = replica.load_state(disk)
    assert (st.state, st.committed_offset) == (RECEIVING, 4 * BS)  # the durable offset is the acked one


# -- CommitPipeline against a fake replica disk


class FakeSink:
    """Records what the pipeline asks; `fail_commit` makes that commit (1-based) raise."""

    def __init__(self, fail_commit: int = 0) -> None:
        self.applied: list[int] = []
        self.commits: list[int] = []
        self.fail_commit = fail_commit
        self.digest = PassDigest()

    def apply(self, batch: DecodedBatch) -> int:
        self.applied.append(batch.seq)
        self.digest = self.digest.merge(batch.digest)
        return batch.data_bytes

    def mark(self, offset: int, *, final: bool) -> CommitPoint:
        return CommitPoint(offset, final, self.digest, 0)

    def commit(self, point: CommitPoint) -> DiskState:
        self.commits.append(point.offset)
        if len(self.commits) == self.fail_commit:
            raise DiskError("the disk went away")
        st = DiskState(SIZE, BS, "s1", COMPLETE if point.final else RECEIVING, committed_offset=point.offset)
        st.session_digest = point.digest
        return st


async def pipeline_run(sink: FakeSink, *, ack_every: int, early_end: bool = False) -> list[target_pb2.TransferAck]:
    acks: list[target_pb2.TransferAck] = []

    async def send(ack: target_pb2.TransferAck) -> None:
        acks.append(ack)

    queue: asyncio.Queue[Queued] = asyncio.Queue()
    dec = BatchDecoder(disk_size=SIZE, block_size=BS, start=0)
    batches = whole_disk()[:2] if early_end else whole_disk()
    for f in batches:
        queue.put_nowait(dec.receive(f))
    if early_end:
        queue.put_nowait(None)
    p = CommitPipeline(sink, ack_every=ack_every, send_ack=send, touch=lambda: None)
    try:
        await p.run(queue)
    finally:
        assert p.received == 2 * BS * len(sink.applied)
    return acks


async def test_the_pipeline_commits_every_ack_every_batches_and_after_the_final_one() -> None:
    sink = FakeSink()
    acks = await pipeline_run(sink, ack_every=3)
    assert sink.applied == [0, 1, 2, 3] and sink.commits == [6 * BS, SIZE]
    assert [(a.seq, a.committed_offset, a.complete) for a in acks] == [(2, 6 * BS, False), (3, SIZE, True)]
    assert PassDigest.from_wire(acks[-1].session_digest) == sink.digest


async def test_the_pipeline_commits_what_arrived_when_the_proxy_ends_early() -> None:
    sink = FakeSink()
    acks = await pipeline_run(sink, ack_every=8, early_end=True)
    assert [(a.seq, a.committed_offset, a.complete) for a in acks] == [(1, 4 * BS, False)]


async def test_a_failing_commit_is_never_acknowledged() -> None:
    sink = FakeSink(fail_commit=2)
    acks: list[target_pb2.TransferAck] = []
    with pytest.raises(DiskError):
        acks = await pipeline_run(sink, ack_every=1)
    assert sink.commits[:2] == [2 * BS, 4 * BS] and acks == []
