"""Transfer frames for tests: good ones through the real encoder, malformed ones from hand-made headers.

The one place in the tests that spells the BatchHeader's and the Extent's fields: a change to the batch
format changes vmrepl/batch.py, this module and tests/unit/test_batch.py (which checks every field).
"""

from __future__ import annotations

import time

from cryptography.hazmat.primitives.asymmetric import ed25519

from vmrepl.batch import (
    DATA,
    PROTOCOL_VERSIONS,
    RAW,
    BatchDecoder,
    BatchEncoder,
    DecodedBatch,
    EncodedBatch,
    decode_frame,
    encode_batch,
    encode_open,
)
from vmrepl.block import digest, is_zero
from vmrepl.domain import Compression
from vmrepl.errors import BatchError
from vmrepl.extent import MiB
from vmrepl.security.ticket import sign_ticket
from vmrepl.v1 import common_pb2, target_pb2


def encoded(
    seq: int,
    start: int,
    blocks: list[bytes],
    *,
    final: bool,
    end: int | None = None,
    compression: Compression = Compression.NONE,
) -> EncodedBatch:
    """A well-formed batch from `start` holding `blocks` one after another (zero blocks as zero extents)."""
    end = start + sum(len(b) for b in blocks) if end is None else end
    enc = BatchEncoder(seq=seq, start=start, end=end, final=final, compression=compression)
    at = start
    for b in blocks:
        if is_zero(b):
            enc.add_zero(at, len(b))
        else:
            enc.add_data(at, b, digest(b))
        at += len(b)
    return enc.finish()


def data_batch(seq: int, start: int, blocks: list[bytes], *, final: bool = False, end: int | None = None) -> bytes:
    return encoded(seq, start, blocks, final=final, end=end).frame


def block_frame(seq: int, data: bytes, *, blocks: int) -> bytes:
    """Batch `seq` of a one-block-per-batch stream over `blocks` blocks: block `seq` holds `data`."""
    return data_batch(seq, seq * len(data), [data], final=seq == blocks - 1)


def decoded(start: int, blocks: list[bytes], *, disk_size: int, block_size: int) -> DecodedBatch:
    """What the target's writer gets for a first batch at `start`: received, checked, decoded."""
    frame = data_batch(0, start, blocks, final=start + sum(len(b) for b in blocks) == disk_size)
    return BatchDecoder(disk_size=disk_size, block_size=block_size, start=start).receive(frame).decode()


def extent(
    offset: int,
    data: bytes,
    *,
    length: int | None = None,
    encoding: common_pb2.Encoding.ValueType = RAW,
    stored_size: int | None = None,
    block_digest: bytes | None = None,
) -> target_pb2.Extent:
    """A data extent as a proxy would describe `data` at `offset`, each field overridable to break it."""
    return target_pb2.Extent(
        offset=offset,
        length=len(data) if length is None else length,
        kind=DATA,
        encoding=encoding,
        stored_size=len(data) if stored_size is None else stored_size,
        digest=digest(data) if block_digest is None else block_digest,
    )


def raw_batch(
    extents: list[target_pb2.Extent],
    parts: list[bytes],
    *,
    seq: int = 0,
    start: int = 0,
    end: int,
    final: bool = False,
    payload_size: int | None = None,
) -> bytes:
    """A batch frame from a hand-made header (which may be malformed on purpose)."""
    hdr = target_pb2.BatchHeader(
        seq=seq,
        start_offset=start,
        end_offset=end,
        extents=extents,
        payload_size=sum(len(p) for p in parts) if payload_size is None else payload_size,
        final=final,
    )
    return encode_batch(hdr, parts)


def shifted(frame: bytes, by: int) -> bytes:
    """Batch 0 of a stream from offset 0 moved `by` bytes later (to follow a resume offset); any other frame,
    or bytes that are not a frame, as they are."""
    try:
        f = decode_frame(frame)
    except BatchError:
        return frame
    if f.batch is None or f.batch.start_offset != 0 or f.batch.seq != 0:
        return frame
    hdr = f.batch
    hdr.start_offset = by
    hdr.end_offset += by
    for e in hdr.extents:
        e.offset += by
    return encode_batch(hdr, [bytes(f.payload)] if len(f.payload) else [])


def signed_open(
    key: ed25519.Ed25519PrivateKey,
    *,
    session_id: str,
    checkpoint_id: str,
    replica_path: str,
    disk_size: int,
    block_size: int = MiB,
    window: int = 4,
    proxy: str = "proxy",
    ticket_disk: str = "disk0",
    ttl: float = 60.0,
    pass_number: int = 0,
    protocol_versions: tuple[int, ...] = PROTOCOL_VERSIONS,
) -> bytes:
    """A Transfer open for disk0 with the ticket a controller would sign for `proxy` (`ticket_disk` to
    make it name another disk)."""
    ticket = sign_ticket(
        key,
        session_id=session_id,
        disk_id=ticket_disk,
        replica_path=replica_path,
        checkpoint_id=checkpoint_id,
        proxy=proxy,
        expires_unix=time.time() + ttl,
        audience="target",
    )
    opening = target_pb2.TransferOpen(
        ticket=ticket,
        session_id=session_id,
        disk_id="disk0",
        replica_path=replica_path,
        disk_size=disk_size,
        block_size=block_size,
        window_batches=window,
        checkpoint_id=checkpoint_id,
        pass_number=pass_number,
        protocol_versions=protocol_versions,
    )
    return encode_open(opening)
