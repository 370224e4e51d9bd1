"""What a disk transfer needs of its target, behind a small typed interface.

`TargetLink` opens Transfer streams and reads the replica's digests; `GrpcTargetLink` is the one over a
gRPC channel, and the in-process tests use a fake. A stream (`TransferCall`) reports every way it can
break as `StreamBroken` with a status code, so the code above it never sees grpc.aio's exceptions.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Protocol

import grpc

from vmrepl.block import DIGEST_SIZE, UNKNOWN_DIGEST
from vmrepl.domain import MAX_DIGESTS_PER_CALL
from vmrepl.v1 import target_pb2

TRANSFER_METHOD = "/vmrepl.v1.TargetAgent/Transfer"
READ_DIGESTS_METHOD = "/vmrepl.v1.TargetAgent/ReadDigests"


class StreamBroken(Exception):
    """The Transfer stream ended before the transfer did."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


def refused(failure: target_pb2.TransferFailure) -> StreamBroken:
    """The target's in-band reason for ending the stream (trusted over the call status, see grpc#36066)."""
    code = grpc.StatusCode.__members__.get(failure.code, grpc.StatusCode.UNKNOWN)
    return StreamBroken(code, failure.message)


class TransferCall(Protocol):
    async def write(self, frame: bytes) -> None:
        """Send one frame; StreamBroken if the call has ended."""

    async def read(self) -> target_pb2.TransferResponse | None:
        """The target's next message, None once it ended the stream; StreamBroken if the call failed."""

    async def done_writing(self) -> None: ...

    async def status(self) -> tuple[grpc.StatusCode, str]:
        """The call's status once it ended (after `read` returned None)."""

    def cancel(self) -> None: ...

    def done(self) -> bool: ...


class TargetLink(Protocol):
    def open_transfer(self) -> TransferCall: ...

    def read_digests(self, request: target_pb2.ReadDigestsRequest) -> AsyncIterator[target_pb2.DigestChunk]: ...

    async def close(self) -> None: ...


async def broken(call: TransferCall) -> StreamBroken:
    """Why a call that ended early ended (an OK status there is itself a break)."""
    code, details = await call.status()
    if code == grpc.StatusCode.OK:
        return StreamBroken(grpc.StatusCode.UNAVAILABLE, "the target ended the stream early")
    return StreamBroken(code, details)


class _GrpcTransferCall:
    def __init__(self, call: grpc.aio.StreamStreamCall[bytes, target_pb2.TransferResponse]) -> None:
        self._call = call

    async def write(self, frame: bytes) -> None:
        try:
            await self._call.write(frame)
        except grpc.aio.AioRpcError as e:
            raise StreamBroken(e.code(), e.details() or "") from e
        except asyncio.InvalidStateError:  # the call ended while we wrote
            raise await broken(self) from None

    async def read(self) -> target_pb2.TransferResponse | None:
        try:
            msg = await self._call.read()
        except grpc.aio.AioRpcError as e:
            raise StreamBroken(e.code(), e.details() or "") from e
        return None if msg is grpc.aio.EOF else msg

    async def done_writing(self) -> None:
        try:
            await self._call.done_writing()
        except grpc.aio.AioRpcError as e:
            raise StreamBroken(e.code(), e.details() or "") from e

    async def status(self) -> tuple[grpc.StatusCode, str]:
        return await self._call.code(), await self._call.details() or ""

    def cancel(self) -> None:
        self._call.cancel()

    def done(self) -> bool:
        return bool(self._call.done())


class GrpcTargetLink:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._channel = channel

    def open_transfer(self) -> TransferCall:
        method = self._channel.stream_stream(
            TRANSFER_METHOD, request_serializer=None, response_deserializer=target_pb2.TransferResponse.FromString
        )
        return _GrpcTransferCall(method())

    def read_digests(self, request: target_pb2.ReadDigestsRequest) -> AsyncIterator[target_pb2.DigestChunk]:
        method = self._channel.unary_stream(
            READ_DIGESTS_METHOD,
            request_serializer=target_pb2.ReadDigestsRequest.SerializeToString,
            response_deserializer=target_pb2.DigestChunk.FromString,
        )
        return aiter(method(request))

    async def close(self) -> None:
        await self._channel.close()


async def read_digest_table(
    link: TargetLink, request: target_pb2.ReadDigestsRequest, *, block_size: int, blocks: int
) -> bytes:
    """The replica's digests of `blocks` blocks from `request.first_block`, one table of 16-byte slots.

    Read in pages of at most MAX_DIGESTS_PER_CALL blocks (the target refuses a larger call); a page that
    ends short (the replica has fewer blocks) ends the table. Digests kept at another block size vouch for
    nothing here: every slot is then unknown (zero bytes)."""
    parts = []
    first, end = request.first_block, request.first_block + blocks
    while first < end:
        page = target_pb2.ReadDigestsRequest()
        page.CopyFrom(request)
        page.first_block, page.block_count = first, min(MAX_DIGESTS_PER_CALL, end - first)
        got = 0
        async for chunk in link.read_digests(page):
            if chunk.block_size != block_size:
                return UNKNOWN_DIGEST * blocks
            parts.append(chunk.digests)
            got += len(chunk.digests) // DIGEST_SIZE
        if got < page.block_count:
            break
        first += got
    return b"".join(parts)
