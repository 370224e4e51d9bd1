"""The target's ReadDigests with the real servicer in process (a fake gRPC context, the replica in a temporary
directory): calls bounded per caller and in total, a call's size bounded, and the proxy's paging through a disk
of more blocks than one call may answer."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from proxy_agent.target_link import TransferCall, read_digest_table
from target_agent import replica
from target_agent.config import TargetSettings
from target_agent.servicer import TargetAgentServicer
from vmrepl.block import DIGEST_SIZE, UNKNOWN_DIGEST
from vmrepl.domain import MAX_DIGESTS_PER_CALL
from vmrepl.security import certs
from vmrepl.v1 import target_pb2

BS = 64 * 1024


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class FakeContext:
    def __init__(self, pem: bytes) -> None:
        self.pem = pem

    def auth_context(self) -> Mapping[str, Sequence[bytes]]:
        return {"x509_pem_cert": [self.pem]}

    async def abort(self, code: grpc.StatusCode, details: str, trailing_metadata: Any = ()) -> None:
        raise Aborted(code, details)


@pytest.fixture(scope="module")
def pems(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("certs")
    certs.create_ca(d)
    for name in ("ctl-a", "ctl-b", "ctl-c"):
        certs.issue(d, name=name, role="controller", hosts=["localhost"])
    return {name: (d / f"{name}.pem").read_bytes() for name in ("ctl-a", "ctl-b", "ctl-c")}


def servicer(root: Path, *, per_peer: int = 2, total: int = 3) -> TargetAgentServicer:
    key = root / "controller.pub"
    key.write_bytes(
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    settings = TargetSettings.model_validate(
        {
            "datastore_root": root / "store",
            "controller_public_keys": [key],
            "tls": {"ca_file": root / "ca.pem", "cert_file": root / "t.pem", "key_file": root / "t.key"},
            "max_digest_reads_per_peer": per_peer,
            "max_digest_reads": total,
        }
    )
    return TargetAgentServicer(settings)


def prepared(s: TargetAgentServicer, *, blocks: int) -> replica.DigestStore:
    disk = s.datastore.disk_dir("jobs/vm1", "disk0")
    replica.prepare(
        disk, guard=s.receiver.guard(disk), disk_size=blocks * BS, block_size=BS, session_id="s1", checkpoint_id="cp1"
    )
    return replica.DigestStore(disk / replica.DIGESTS_FILE, block_size=BS, disk_size=blocks * BS)


def request(block_count: int = 0) -> target_pb2.ReadDigestsRequest:
    return target_pb2.ReadDigestsRequest(replica_path="jobs/vm1", disk_id="disk0", block_count=block_count)


def spy_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every replica file read ReadDigests makes, by name."""
    reads: list[str] = []
    for name in ("load_state", "read_digests"):
        real: Callable[..., Any] = getattr(replica, name)

        def spy(*args: Any, _real: Callable[..., Any] = real, _name: str = name) -> Any:
            reads.append(_name)
            return _real(*args)

        monkeypatch.setattr(replica, name, spy)
    return reads


async def test_calls_past_the_limit_per_caller_and_in_total_are_refused_before_any_read(
    tmp_path: Path, pems: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    s = servicer(tmp_path, per_peer=2, total=3)
    prepared(s, blocks=4)
    reads = spy_reads(monkeypatch)
    held = []
    for peer in ("ctl-a", "ctl-a", "ctl-b"):  # each stream holds its slot while suspended at its first chunk
        call = aiter(s.ReadDigests(request(block_count=4), FakeContext(pems[peer])))
        assert len((await anext(call)).digests) == 4 * DIGEST_SIZE
        held.append(call)
    before = len(reads)
    with pytest.raises(Aborted, match="'ctl-a' already has 2 ReadDigests calls open") as per_peer:
        await anext(aiter(s.ReadDigests(request(block_count=4), FakeContext(pems["ctl-a"]))))
    with pytest.raises(Aborted, match="3 ReadDigests calls are open") as total:
        await anext(aiter(s.ReadDigests(request(block_count=4), FakeContext(pems["ctl-c"]))))
    assert per_peer.value.code == total.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(reads) == before  # nothing was read for a refused call

    for call in held:  # a stream that ends (here: the caller went away) gives its slot back
        await call.aclose()  # type: ignore[attr-defined]
    assert s.digest_slots.in_use == 0
    chunks = [c async for c in s.ReadDigests(request(block_count=4), FakeContext(pems["ctl-c"]))]
    assert [len(c.digests) for c in chunks] == [4 * DIGEST_SIZE]


async def test_a_call_for_more_blocks_than_the_cap_is_refused_naming_the_field(
    tmp_path: Path, pems: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    s = servicer(tmp_path)
    prepared(s, blocks=4)
    reads = spy_reads(monkeypatch)
    with pytest.raises(Aborted, match=f"block_count: must be at most {MAX_DIGESTS_PER_CALL}") as e:
        await anext(aiter(s.ReadDigests(request(block_count=MAX_DIGESTS_PER_CALL + 1), FakeContext(pems["ctl-a"]))))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert reads == [] and s.digest_slots.in_use == 0


class InProcessLink:
    """The proxy's TargetLink, answered by the servicer in process; it records each ReadDigests request."""

    def __init__(self, s: TargetAgentServicer, pem: bytes) -> None:
        self.servicer = s
        self.pem = pem
        self.requests: list[tuple[int, int]] = []

    def open_transfer(self) -> TransferCall:
        raise NotImplementedError("not used by digest reads")

    async def read_digests(self, req: target_pb2.ReadDigestsRequest) -> AsyncIterator[target_pb2.DigestChunk]:
        self.requests.append((req.first_block, req.block_count))
        async for chunk in self.servicer.ReadDigests(req, FakeContext(self.pem)):
            yield chunk

    async def close(self) -> None:
        return None


async def test_the_proxy_pages_through_a_disk_of_more_blocks_than_one_call_answers(
    tmp_path: Path, pems: dict[str, bytes]
) -> None:
    blocks = MAX_DIGESTS_PER_CALL + 5  # a sparse replica of 64 GiB: 16 MiB of digests
    s = servicer(tmp_path)
    store = prepared(s, blocks=blocks)
    marked = {0: b"a", MAX_DIGESTS_PER_CALL - 1: b"b", MAX_DIGESTS_PER_CALL: b"c", blocks - 1: b"d"}
    for block, mark in marked.items():
        store.put(block * BS, mark * DIGEST_SIZE)
    store.close()

    with pytest.raises(Aborted, match="block_count: must be at most") as e:  # the whole disk in one call
        await anext(aiter(s.ReadDigests(request(), FakeContext(pems["ctl-a"]))))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT

    link = InProcessLink(s, pems["ctl-a"])
    table = await read_digest_table(link, request(), block_size=BS, blocks=blocks)
    assert link.requests == [(0, MAX_DIGESTS_PER_CALL), (MAX_DIGESTS_PER_CALL, 5)]
    expected = bytearray(UNKNOWN_DIGEST * blocks)
    for block, mark in marked.items():
        expected[block * DIGEST_SIZE : (block + 1) * DIGEST_SIZE] = mark * DIGEST_SIZE
    assert table == expected  # each page in its place, nothing lost or doubled at the seam
    assert s.digest_slots.in_use == 0
