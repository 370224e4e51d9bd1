"""The Transfer stream's batch format, owned here for both ends.

The proxy builds a batch with a `BatchEncoder` (`add_data`, `add_zero`, then
`finish` into a frame and the batch's `PassDigest`); the target reads a stream
with a `BatchDecoder`, which checks each frame against the disk and the stream
so far (`ReceivedBatch`, on the event loop: headers only) and, in a worker
thread, decompresses and verifies its data (`ReceivedBatch.decode` ->
`DecodedBatch`). Nothing outside this module reads or writes a `BatchHeader`
or an `Extent` message.

A frame on the wire is a serialised `vmrepl.v1.TransferRequest`. Batches are
framed by hand rather than through protobuf so the payload is copied once
when sent (one join) and never when received (a memoryview into the gRPC
message): fields 2 (BatchHeader) and 15 (payload) are written as
length-delimited fields exactly as protobuf would, so any protobuf
implementation can parse them. See docs/protocol.md.

Validation is pure: `check_batch` raises `BatchError` naming the bad field,
and nothing is decompressed before every size in the header has been checked
against the disk and the limits.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import xxhash

from vmrepl.block import DIGEST_SIZE, compress, decompress, verify
from vmrepl.domain import MAX_BLOCK_SIZE, Compression
from vmrepl.errors import BatchError, FailedPrecondition, InvalidArgument
from vmrepl.extent import MiB
from vmrepl.v1 import common_pb2, target_pb2

# A batch carries at most this many raw data bytes (and at least one block).
MAX_BATCH_DATA = 16 * MiB
MAX_EXTENTS = 4096
# An Extent message is at most ~60 bytes (5 varints, 16-byte digest, tags).
MAX_HEADER_BYTES = MAX_EXTENTS * 64 + 256
# The largest valid Transfer message: both ends set gRPC's limits to this.
MAX_MESSAGE_BYTES = max(MAX_BATCH_DATA, MAX_BLOCK_SIZE) + MAX_HEADER_BYTES + 64
# Passes over a disk in one transfer: 0, and 1 when sampled verification re-runs it as a comparison.
MAX_PASS = 1
# The largest valid open message (a ticket and a few names: well under 1 KiB). gRPC's limit is per message,
# so the target checks the open's own length before it parses it.
MAX_OPEN_BYTES = 64 * 1024

# Versions of the Transfer protocol (frames, batches, pass digests) this code speaks, oldest first. A change
# an older peer would misread gets a new version, and both ends keep the old one for as long as they can.
PROTOCOL_VERSIONS: tuple[int, ...] = (1,)
# What a peer from before versions were negotiated speaks (it sends no versions, or answers 0).
UNVERSIONED = 1


def _names(versions: Sequence[int], *, most: int = 8) -> str:
    """At most `most` distinct versions: an open may list thousands, and the refusal is one line."""
    distinct = sorted(set(versions))
    shown = ", ".join(str(v) for v in distinct[:most])
    return shown if len(distinct) <= most else f"{shown} and {len(distinct) - most} more"


def choose_version(offered: Sequence[int], *, speaks: Sequence[int] = PROTOCOL_VERSIONS) -> int:
    """The target's choice among the versions the proxy offered: the highest both speak."""
    theirs = list(offered) or [UNVERSIONED]
    common = set(theirs) & set(speaks)
    if not common:
        raise FailedPrecondition(
            f"the proxy speaks Transfer protocol version(s) {_names(theirs)}, this target speaks "
            f"{_names(speaks)}: upgrade the older of the two agents"
        )
    return max(common)


def check_chosen_version(chosen: int, *, speaks: Sequence[int] = PROTOCOL_VERSIONS) -> int:
    """The proxy's check of the target's answer."""
    version = chosen or UNVERSIONED
    if version not in speaks:
        raise FailedPrecondition(
            f"the target chose Transfer protocol version {version}, this proxy speaks {_names(speaks)}"
        )
    return version


_HEX = frozenset("0123456789abcdefABCDEF")
# TransferRequest's fields, all length-delimited (wire type 2): open, batch (its header) and payload.
_OPEN, _BATCH, _PAYLOAD = 1, 2, 15
_TAG_BATCH = (_BATCH << 3) | 2
_TAG_PAYLOAD = (_PAYLOAD << 3) | 2

DATA = common_pb2.EXTENT_KIND_DATA
ZERO = common_pb2.EXTENT_KIND_ZERO
RAW = common_pb2.ENCODING_RAW
LZ4 = common_pb2.ENCODING_LZ4


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(data: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while pos < len(data) and shift < 64:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
    raise BatchError("frame", "truncated or overlong varint")


def encode_batch(header: target_pb2.BatchHeader, payload_parts: list[bytes]) -> bytes:
    """Frame a batch: one join of the header and the payload parts (tests frame hand-made headers with it)."""
    hdr = header.SerializeToString()
    plen = sum(len(p) for p in payload_parts)
    head = [bytes((_TAG_BATCH,)), varint(len(hdr)), hdr]
    if plen:
        head += [bytes((_TAG_PAYLOAD,)), varint(plen)]
    return b"".join(head + payload_parts)


def encode_open(open_msg: target_pb2.TransferOpen) -> bytes:
    return target_pb2.TransferRequest(open=open_msg).SerializeToString()


@dataclass(slots=True)
class Frame:
    open: target_pb2.TransferOpen | None
    batch: target_pb2.BatchHeader | None
    payload: memoryview


def decode_frame(data: bytes) -> Frame:
    """Parse one TransferRequest without copying its payload."""
    view = memoryview(data)
    pos = 0
    fields: dict[int, memoryview] = {}
    while pos < len(view):
        tag, pos = _read_varint(view, pos)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            _, pos = _read_varint(view, pos)
            continue
        if wire in {1, 5}:
            pos += 8 if wire == 1 else 4
            continue
        if wire != 2:
            raise BatchError("frame", f"unsupported wire type {wire} for field {field}")
        length, pos = _read_varint(view, pos)
        if pos + length > len(view):
            raise BatchError("frame", f"field {field} runs past the end of the message")
        if field in fields:
            raise BatchError("frame", f"field {field} appears twice")
        fields[field] = view[pos : pos + length]
        pos += length
    if pos != len(view):
        raise BatchError("frame", "message ends inside a field")
    if (_OPEN in fields) == (_BATCH in fields):
        raise BatchError("frame", "a frame carries exactly one of open and batch")
    payload = fields.get(_PAYLOAD, memoryview(b""))
    try:
        if _OPEN in fields:
            return Frame(target_pb2.TransferOpen.FromString(fields[_OPEN].tobytes()), None, payload)
        if len(fields[_BATCH]) > MAX_HEADER_BYTES:
            raise BatchError("batch", f"header of {len(fields[_BATCH])} bytes exceeds {MAX_HEADER_BYTES}")
        return Frame(None, target_pb2.BatchHeader.FromString(fields[_BATCH].tobytes()), payload)
    except BatchError:
        raise
    except Exception as e:  # protobuf's DecodeError and friends
        raise BatchError("frame", f"header does not parse: {e}") from e


@dataclass(frozen=True, slots=True)
class Expectation:
    """What the receiver knows before a batch arrives."""

    disk_size: int
    block_size: int
    seq: int
    start: int


@dataclass(frozen=True, slots=True)
class CheckedExtent:
    offset: int
    length: int
    kind: int
    encoding: int
    digest: bytes
    payload: memoryview


def _aligned(offset: int, end: int, exp: Expectation) -> bool:
    return offset % exp.block_size == 0 and (end % exp.block_size == 0 or end == exp.disk_size)


def _check_extent(i: int, ext: target_pb2.Extent, hdr: target_pb2.BatchHeader, exp: Expectation) -> None:
    where = f"batch.extents[{i}]"
    end = ext.offset + ext.length
    if ext.length == 0:
        raise BatchError(where, "length is zero")
    if ext.offset < hdr.start_offset or end > hdr.end_offset:
        raise BatchError(where, f"[{ext.offset}, {end}) lies outside the batch range")
    if not _aligned(ext.offset, end, exp):
        raise BatchError(where, f"[{ext.offset}, {end}) is not aligned to the {exp.block_size}-byte blocks")
    if ext.kind == ZERO:
        if ext.stored_size or ext.digest or ext.encoding:
            raise BatchError(where, "a zero extent carries no encoding, stored size or digest")
        return
    if ext.kind != DATA:
        raise BatchError(where, f"unknown kind {ext.kind}")
    if ext.length > exp.block_size:
        raise BatchError(where, f"data extent of {ext.length} bytes exceeds the block size")
    if len(ext.digest) != DIGEST_SIZE:
        raise BatchError(where, f"digest must be {DIGEST_SIZE} bytes")
    if ext.encoding == RAW:
        if ext.stored_size != ext.length:
            raise BatchError(where, "a raw extent's stored size must equal its length")
    elif ext.encoding == LZ4:
        if not 0 < ext.stored_size <= ext.length:
            raise BatchError(where, "an lz4 extent's stored size must be between 1 and its length")
    else:
        raise BatchError(where, f"unknown encoding {ext.encoding}")


def check_batch(hdr: target_pb2.BatchHeader, payload: memoryview, exp: Expectation) -> list[CheckedExtent]:
    """Validate a batch against the disk and the stream; return its extents with payload slices."""
    if hdr.seq != exp.seq:
        raise BatchError("batch.seq", f"expected {exp.seq}, got {hdr.seq}")
    if hdr.start_offset != exp.start:
        raise BatchError("batch.start_offset", f"expected {exp.start}, got {hdr.start_offset}")
    if hdr.end_offset > exp.disk_size or hdr.end_offset < hdr.start_offset:
        raise BatchError("batch.end_offset", f"{hdr.end_offset} is outside [{hdr.start_offset}, disk size]")
    if hdr.final != (hdr.end_offset == exp.disk_size):
        raise BatchError("batch.final", "the final batch, and only it, ends at the disk size")
    if hdr.end_offset == hdr.start_offset and not hdr.final:
        raise BatchError("batch.end_offset", "an empty batch must be the final one")
    if len(hdr.extents) > MAX_EXTENTS:
        raise BatchError("batch.extents", f"{len(hdr.extents)} extents exceed the limit of {MAX_EXTENTS}")
    if hdr.payload_size != len(payload):
        raise BatchError("batch.payload_size", f"header says {hdr.payload_size}, payload has {len(payload)}")
    out: list[CheckedExtent] = []
    prev_end = hdr.start_offset
    pos = data_bytes = 0
    for i, ext in enumerate(hdr.extents):
        _check_extent(i, ext, hdr, exp)
        if ext.offset < prev_end:
            raise BatchError(f"batch.extents[{i}]", "extents overlap or are out of order")
        prev_end = ext.offset + ext.length
        size = ext.stored_size
        if pos + size > len(payload):
            raise BatchError(f"batch.extents[{i}]", "stored sizes exceed the payload")
        if ext.kind == DATA:
            data_bytes += ext.length
            if data_bytes > MAX_BATCH_DATA:
                raise BatchError("batch.extents", f"data extents exceed {MAX_BATCH_DATA} bytes in one batch")
        out.append(CheckedExtent(ext.offset, ext.length, ext.kind, ext.encoding, ext.digest, payload[pos : pos + size]))
        pos += size
    if pos != len(payload):
        raise BatchError("batch.payload_size", f"stored sizes add up to {pos}, payload has {len(payload)}")
    return out


_TOKEN = struct.Struct("<QQB")
_MOD = 1 << 128
PASS_DIGEST_SIZE = 16


@dataclass(frozen=True, slots=True)
class PassDigest:
    """Order-free digest of a pass: the sum mod 2^128 of one token per extent sent.

    Both ends keep it; because it is a sum, the value at any committed offset is well defined, a resumed
    stream continues from it, and a batch's digest merges into the pass's in any order. The one value type
    for the proxy, the wire (`to_wire`: 16 bytes big-endian) and the target's state.json (`to_state`: hex).
    """

    value: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.value < _MOD:
            raise ValueError(f"a pass digest is below 2^128, not {self.value}")

    @classmethod
    def of_extent(cls, offset: int, length: int, kind: int, digest: bytes) -> PassDigest:
        return cls(xxhash.xxh3_128_intdigest(_TOKEN.pack(offset, length, kind) + digest))

    def add(self, offset: int, length: int, kind: int, digest: bytes) -> PassDigest:
        return self.merge(PassDigest.of_extent(offset, length, kind, digest))

    def merge(self, other: PassDigest) -> PassDigest:
        return PassDigest((self.value + other.value) % _MOD)

    def to_wire(self) -> bytes:
        return self.value.to_bytes(PASS_DIGEST_SIZE, "big")

    @classmethod
    def from_wire(cls, raw: bytes, *, field: str = "session_digest") -> PassDigest:
        """Empty bytes: the digest of nothing (an older peer, or a fresh pass)."""
        if not raw:
            return cls()
        if len(raw) != PASS_DIGEST_SIZE:
            raise InvalidArgument(field, f"a pass digest has {PASS_DIGEST_SIZE} bytes, not {len(raw)}")
        return cls(int.from_bytes(raw, "big"))

    def to_state(self) -> str:
        return f"{self.value:032x}"

    @classmethod
    def from_state(cls, text: str) -> PassDigest:
        """The state.json form; "" (a pass that committed nothing yet, as format 1 wrote it) is zero."""
        if not text:
            return cls()
        # int(..., 16) also takes "_", spaces and non-ASCII digits: a planted state must not parse as a digest
        if len(text) != 2 * PASS_DIGEST_SIZE or not all(c in _HEX for c in text):
            raise ValueError(f"a pass digest is {2 * PASS_DIGEST_SIZE} hex digits, not {text!r}")
        return cls(int(text, 16))

    def __str__(self) -> str:
        return self.to_state()


# ---- the proxy's end: building a batch


@dataclass(frozen=True, slots=True)
class EncodedBatch:
    frame: bytes
    # The pass digest of this batch's extents alone (merged into the pass's as it is sent).
    digest: PassDigest
    data_bytes: int


class BatchEncoder:
    """One batch of [start, end): add its extents in offset order, then `finish` into a frame.

    Data blocks are compressed here when that shrinks them; adjacent zero extents merge into one.
    """

    def __init__(self, *, seq: int, start: int, end: int, final: bool, compression: Compression) -> None:
        self._header = target_pb2.BatchHeader(seq=seq, start_offset=start, end_offset=end, final=final)
        self._compression = compression
        self._parts: list[bytes] = []
        self._payload = 0
        self._data = 0

    def add_data(self, offset: int, data: bytes | bytearray, block_digest: bytes) -> None:
        """A block whose raw bytes are `data` and whose xxh3-128 is `block_digest` (the caller computed it)."""
        packed = compress(data, self._compression)
        stored = packed if packed is not None else bytes(data)
        self._header.extents.append(
            target_pb2.Extent(
                offset=offset,
                length=len(data),
                kind=DATA,
                encoding=LZ4 if packed is not None else RAW,
                stored_size=len(stored),
                digest=block_digest,
            )
        )
        self._parts.append(stored)
        self._payload += len(stored)
        self._data += len(data)

    def add_zero(self, offset: int, length: int) -> None:
        extents = self._header.extents
        last = extents[-1] if extents else None
        if last is not None and last.kind == ZERO and last.offset + last.length == offset:
            last.length += length
        else:
            extents.add(offset=offset, length=length, kind=ZERO)

    def finish(self) -> EncodedBatch:
        hdr = self._header
        hdr.payload_size = self._payload
        token = PassDigest()
        for e in hdr.extents:
            token = token.add(e.offset, e.length, e.kind, e.digest)
        return EncodedBatch(frame=encode_batch(hdr, self._parts), digest=token, data_bytes=self._data)


# ---- the target's end: checking and decoding a stream of batches


@dataclass(frozen=True, slots=True)
class DecodedExtent:
    offset: int
    length: int
    # The block's verified xxh3-128 (empty for zeros).
    digest: bytes
    # The raw bytes, None for a zero extent.
    data: bytes | memoryview | None


@dataclass(frozen=True, slots=True)
class DecodedBatch:
    seq: int
    end: int
    final: bool
    extents: list[DecodedExtent]
    digest: PassDigest
    data_bytes: int


@dataclass(frozen=True, slots=True)
class ReceivedBatch:
    """A batch whose header was checked against the disk and the stream; its payload is not decoded yet."""

    seq: int
    start: int
    end: int
    final: bool
    extents: list[CheckedExtent]
    wire_bytes: int

    @property
    def data_bytes(self) -> int:
        return sum(e.length for e in self.extents if e.kind == DATA)

    def decode(self) -> DecodedBatch:
        """Decompress and verify every data extent (blocking: call it in a worker thread).

        Raises InvalidArgument for lz4 data that does not decompress to its length and ChecksumMismatch
        for bytes that do not match their digest; nothing of the batch is to be written then."""
        out: list[DecodedExtent] = []
        token = PassDigest()
        data_bytes = 0
        for e in self.extents:
            if e.kind == DATA:
                data: bytes | memoryview = decompress(e.payload, e.length) if e.encoding == LZ4 else e.payload
                verify(data, e.digest, offset=e.offset)
                out.append(DecodedExtent(e.offset, e.length, e.digest, data))
                data_bytes += e.length
            else:
                out.append(DecodedExtent(e.offset, e.length, b"", None))
            token = token.add(e.offset, e.length, e.kind, e.digest)
        return DecodedBatch(self.seq, self.end, self.final, out, token, data_bytes)


def decode_open(raw: bytes) -> target_pb2.TransferOpen:
    """The first message of a stream, which must be the open."""
    frame = decode_frame(raw)
    if frame.open is None:
        raise BatchError("open", "the first message of a stream must be open")
    return frame.open


class BatchDecoder:
    """The batches of one stream after its open: each must follow the previous one (seq and offset)."""

    def __init__(self, *, disk_size: int, block_size: int, start: int) -> None:
        self._exp = Expectation(disk_size=disk_size, block_size=block_size, seq=0, start=start)

    def receive(self, raw: bytes) -> ReceivedBatch:
        frame = decode_frame(raw)
        if frame.batch is None:
            raise BatchError("open", "open sent twice on one stream")
        hdr = frame.batch
        extents = check_batch(hdr, frame.payload, self._exp)
        exp = self._exp
        self._exp = Expectation(exp.disk_size, exp.block_size, hdr.seq + 1, hdr.end_offset)
        return ReceivedBatch(hdr.seq, hdr.start_offset, hdr.end_offset, hdr.final, extents, len(raw))
