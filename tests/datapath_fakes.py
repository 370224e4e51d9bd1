"""In-process fakes for the data path: a source disk in memory and a target behind `TargetLink`.

`FakeTarget` speaks the Transfer protocol as the real target does (the open and its version, the resume
offset and pass digest in the accept, batches checked and decoded with `vmrepl.batch.BatchDecoder`, an
ack with the pass digest after every batch, pass 1 restarting at offset 0, ReadDigests) but keeps the
replica in memory and commits every batch at once. Scripted faults: refuse every open, break a stream
after some batches, answer another protocol version, corrupt the pass digest.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from proxy_agent.target_link import StreamBroken
from vmrepl.batch import PROTOCOL_VERSIONS, BatchDecoder, PassDigest, choose_version, decode_open
from vmrepl.block import DIGEST_SIZE, digest, is_zero, zero_digest
from vmrepl.disk.base import DiskReader
from vmrepl.errors import VmreplError
from vmrepl.extent import Extent
from vmrepl.rpc import status_for
from vmrepl.v1 import target_pb2


class MemoryReader(DiskReader):
    """A source disk held in memory; `allocated` defaults to the whole disk."""

    def __init__(self, data: bytes | bytearray, allocated: list[Extent] | None = None) -> None:
        self.data = bytearray(data)
        self._allocated = allocated if allocated is not None else [Extent(0, len(data))]
        self.closed = False

    @property
    def size(self) -> int:
        return len(self.data)

    def allocated_extents(self) -> list[Extent]:
        return list(self._allocated)

    def read_into(self, buf: memoryview, offset: int) -> None:
        buf[:] = self.data[offset : offset + len(buf)]

    def close(self) -> None:
        self.closed = True


def block_digests(data: bytes | bytearray, block_size: int) -> bytes:
    """The digest table a target would hold for a replica equal to `data`."""
    out = []
    for at in range(0, len(data), block_size):
        block = bytes(data[at : at + block_size])
        out.append(zero_digest(len(block)) if is_zero(block) else digest(block))
    return b"".join(out)


@dataclass
class FakeTarget:
    """One replica disk on a fake target. The proxy opens streams on it through `open_transfer`."""

    replica: bytearray
    block_size: int
    speaks: tuple[int, ...] = PROTOCOL_VERSIONS
    refuse: tuple[str, str] | None = None  # (status code name, message) for every open
    break_after: list[int] = field(default_factory=list)  # per stream, in order: batches before a cut
    corrupt_digest: bool = False
    answer_version: int | None = None  # answer this version whatever the proxy offered
    digest_faults: list[grpc.StatusCode] = field(default_factory=list)  # raised by the next digest reads, one each
    digest_reads: int = 0
    committed: int = 0
    pass_number: int = 0
    digest: PassDigest = field(default_factory=PassDigest)
    opens: list[target_pb2.TransferOpen] = field(default_factory=list)
    resumed: list[int] = field(default_factory=list)  # the resume offset of every stream accepted
    batches: int = 0  # batches applied over all streams
    closed: bool = False

    def __post_init__(self) -> None:
        self.table = bytearray(block_digests(self.replica, self.block_size))

    # -- TargetLink
    def open_transfer(self) -> FakeCall:
        return FakeCall(self, self.break_after.pop(0) if self.break_after else None)

    async def read_digests(self, request: target_pb2.ReadDigestsRequest) -> AsyncIterator[target_pb2.DigestChunk]:
        self.digest_reads += 1
        if self.digest_faults:
            raise StreamBroken(self.digest_faults.pop(0), "busy")
        yield target_pb2.DigestChunk(first_block=0, block_size=self.block_size, digests=bytes(self.table))

    async def close(self) -> None:
        self.closed = True

    # -- the target's side of a stream
    def accept(self, o: target_pb2.TransferOpen) -> target_pb2.TransferAccept:
        self.opens.append(o)
        if self.refuse is not None:
            raise _Refused(*self.refuse)
        version = choose_version(o.protocol_versions, speaks=self.speaks)
        if o.pass_number > self.pass_number:  # the next pass re-runs the disk from the start
            self.pass_number, self.committed, self.digest = o.pass_number, 0, PassDigest()
        self.resumed.append(self.committed)
        return target_pb2.TransferAccept(
            resume_offset=self.committed,
            session_digest=self.digest.to_wire(),
            protocol_version=self.answer_version if self.answer_version is not None else version,
        )

    def apply(self, decoder: BatchDecoder, frame: bytes) -> target_pb2.TransferAck:
        batch = decoder.receive(frame).decode()
        for e in batch.extents:
            self.replica[e.offset : e.offset + e.length] = bytes(e.length) if e.data is None else e.data
            bs = self.block_size
            first, end = e.offset // bs, -(-(e.offset + e.length) // bs)
            self.table[first * DIGEST_SIZE : end * DIGEST_SIZE] = block_digests(self.replica[first * bs : end * bs], bs)
        self.digest = self.digest.merge(batch.digest)
        self.committed = batch.end
        self.batches += 1
        sent = self.digest.merge(PassDigest(1)) if self.corrupt_digest else self.digest
        return target_pb2.TransferAck(
            seq=batch.seq, committed_offset=batch.end, complete=batch.final, session_digest=sent.to_wire()
        )


class _Refused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class FakeCall:
    """One Transfer stream on a FakeTarget (implements proxy_agent.target_link.TransferCall)."""

    def __init__(self, target: FakeTarget, break_after: int | None) -> None:
        self._target = target
        self._break_after = break_after
        self._responses: asyncio.Queue[target_pb2.TransferResponse | None] = asyncio.Queue()
        self._decoder: BatchDecoder | None = None
        self._status: tuple[grpc.StatusCode, str] | None = None
        self._batches = 0

    def _end(self, code: grpc.StatusCode, details: str) -> None:
        if self._status is None:
            self._status = (code, details)
            self._responses.put_nowait(None)

    def _fail(self, code: str, message: str) -> None:
        self._responses.put_nowait(
            target_pb2.TransferResponse(error=target_pb2.TransferFailure(code=code, message=message))
        )
        self._end(grpc.StatusCode[code], message)

    async def write(self, frame: bytes) -> None:
        if self._status is not None:
            raise StreamBroken(*self._status)
        t = self._target
        try:
            if self._decoder is None:
                o = decode_open(frame)
                accept = t.accept(o)
                self._decoder = BatchDecoder(disk_size=o.disk_size, block_size=o.block_size, start=t.committed)
                self._responses.put_nowait(target_pb2.TransferResponse(accept=accept))
                return
            if self._break_after is not None and self._batches >= self._break_after:
                self._end(grpc.StatusCode.UNAVAILABLE, "connection reset by peer")  # the batch is lost
                return
            self._batches += 1
            self._responses.put_nowait(target_pb2.TransferResponse(ack=t.apply(self._decoder, frame)))
        except _Refused as e:
            self._fail(e.code, e.message)
        except VmreplError as e:
            code, message = status_for(e)
            self._fail(code.name, message)

    async def read(self) -> target_pb2.TransferResponse | None:
        msg = await self._responses.get()
        if msg is None:
            self._responses.put_nowait(None)  # every later read sees the end too
        return msg

    async def done_writing(self) -> None:
        self._end(grpc.StatusCode.OK, "")

    async def status(self) -> tuple[grpc.StatusCode, str]:
        return self._status if self._status is not None else (grpc.StatusCode.UNKNOWN, "still open")

    def cancel(self) -> None:
        self._end(grpc.StatusCode.CANCELLED, "cancelled by the proxy")

    def done(self) -> bool:
        return self._status is not None
