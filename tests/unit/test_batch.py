import os

import lz4.block
import pytest

from vmrepl.batch import (
    DATA,
    LZ4,
    MAX_EXTENTS,
    RAW,
    ZERO,
    Expectation,
    check_batch,
    decode_frame,
    encode_batch,
    encode_open,
    varint,
)
from vmrepl.block import compress, decompress, digest, verify
from vmrepl.domain import Compression
from vmrepl.errors import BatchError, ChecksumMismatch, InvalidArgument
from vmrepl.v1 import target_pb2

BS = 64 * 1024
DISK = 10 * BS
TEXT = (b"the quick brown fox jumps over the lazy dog " * 2000)[:BS]
RANDOM = os.urandom(BS)


def sample() -> tuple[target_pb2.BatchHeader, list[bytes]]:
    packed = compress(TEXT, Compression.DEFAULT)
    assert packed is not None
    extents = [
        target_pb2.Extent(offset=0, length=BS, kind=DATA, encoding=LZ4, stored_size=len(packed), digest=digest(TEXT)),
        target_pb2.Extent(offset=BS, length=2 * BS, kind=ZERO),
        target_pb2.Extent(offset=3 * BS, length=BS, kind=DATA, encoding=RAW, stored_size=BS, digest=digest(RANDOM)),
    ]
    hdr = target_pb2.BatchHeader(
        seq=0, start_offset=0, end_offset=4 * BS, extents=extents, payload_size=len(packed) + BS
    )
    return hdr, [packed, RANDOM]


EXP = Expectation(disk_size=DISK, block_size=BS, seq=0, start=0)


def frame_of(hdr: target_pb2.BatchHeader, parts: list[bytes]) -> tuple[target_pb2.BatchHeader, memoryview]:
    f = decode_frame(encode_batch(hdr, parts))
    assert f.batch is not None
    return f.batch, f.payload


def test_round_trip_and_wire_compatibility_with_protobuf() -> None:
    hdr, parts = sample()
    raw = encode_batch(hdr, parts)
    parsed = target_pb2.TransferRequest.FromString(raw)  # any protobuf parser reads our frames
    assert parsed.batch == hdr and parsed.payload == b"".join(parts)
    f = decode_frame(raw)
    assert f.batch == hdr and bytes(f.payload) == b"".join(parts)
    out = check_batch(f.batch, f.payload, EXP)
    assert decompress(out[0].payload, BS) == TEXT
    assert bytes(out[2].payload) == RANDOM
    verify(bytes(out[2].payload), out[2].digest, offset=out[2].offset)


def test_decode_frame_also_reads_protobuf_serialised_frames() -> None:
    hdr, parts = sample()
    raw = target_pb2.TransferRequest(batch=hdr, payload=b"".join(parts)).SerializeToString()
    f = decode_frame(raw)
    assert f.batch == hdr and bytes(f.payload) == b"".join(parts)
    o = target_pb2.TransferOpen(session_id="s", disk_id="d")
    assert decode_frame(encode_open(o)).open == o


@pytest.mark.parametrize(
    "raw",
    [
        b"",  # neither open nor batch
        bytes([0x12]) + varint(50) + b"x",  # length past the end
        bytes([0x12, 0x80]),  # truncated varint
        bytes([0x0A, 0]) + bytes([0x12, 0]),  # both open and batch
        bytes([0x12, 0]) + bytes([0x12, 0]),  # batch twice
        bytes([0x13]),  # wire type 3
        bytes([0x12, 2, 0xFF, 0xFF]),  # header does not parse
    ],
)
def test_malformed_frames_are_rejected(raw: bytes) -> None:
    with pytest.raises(BatchError):
        decode_frame(raw)


def mutate(change: str) -> tuple[target_pb2.BatchHeader, list[bytes], Expectation]:
    hdr, parts = sample()
    exp = EXP
    e0, e1, e2 = hdr.extents
    match change:
        case "seq":
            hdr.seq = 5
        case "start":
            hdr.start_offset = BS
        case "end_past_disk":
            hdr.end_offset = DISK + BS
        case "end_before_start":
            exp = Expectation(DISK, BS, 0, 5 * BS)
            hdr.start_offset = 5 * BS
        case "final_not_at_end":
            hdr.final = True
        case "end_without_final":
            hdr.end_offset = DISK
        case "payload_size":
            hdr.payload_size += 1
        case "zero_length":
            e1.length = 0
        case "outside_batch":
            e2.offset = 4 * BS
        case "unaligned":
            e1.offset = BS + 512
            e1.length = BS
        case "overlap":
            e1.offset = 0
        case "huge_length":
            e1.length = 2**63
        case "data_longer_than_block":
            e2.length = 2 * BS
            hdr.end_offset = 5 * BS
        case "short_digest":
            e2.digest = b"abc"
        case "raw_size_mismatch":
            e2.stored_size = BS - 1
            hdr.payload_size -= 1
            parts[1] = parts[1][:-1]
        case "lz4_bigger_than_raw":
            e0.stored_size = BS + 1
        case "unknown_kind":
            e1.kind = 9  # type: ignore[assignment]
        case "unknown_encoding":
            e2.encoding = 7  # type: ignore[assignment]
        case "zero_with_payload":
            e1.stored_size = 5
        case "too_many_extents":
            del hdr.extents[:]
            hdr.extents.extend(target_pb2.Extent(offset=0, length=0) for _ in range(MAX_EXTENTS + 1))
            hdr.payload_size = 0
            parts.clear()
        case _:
            raise AssertionError(change)
    return hdr, parts, exp


CASES = [
    "seq",
    "start",
    "end_past_disk",
    "end_before_start",
    "final_not_at_end",
    "end_without_final",
    "payload_size",
    "zero_length",
    "outside_batch",
    "unaligned",
    "overlap",
    "huge_length",
    "data_longer_than_block",
    "short_digest",
    "raw_size_mismatch",
    "lz4_bigger_than_raw",
    "unknown_kind",
    "unknown_encoding",
    "zero_with_payload",
    "too_many_extents",
]


@pytest.mark.parametrize("change", CASES)
def test_every_malformed_field_is_rejected(change: str) -> None:
    hdr, parts, exp = mutate(change)
    h, payload = frame_of(hdr, parts)
    with pytest.raises(BatchError) as err:
        check_batch(h, payload, exp)
    assert err.value.field.startswith("batch")


def test_decompression_bomb_is_bounded() -> None:
    bomb = lz4.block.compress(bytes(64 * 1024 * 1024), store_size=False)  # 64 MiB of zeros in ~250 KiB
    with pytest.raises(InvalidArgument):
        decompress(bomb, BS)


def test_bad_checksum_is_detected() -> None:
    with pytest.raises(ChecksumMismatch):
        verify(TEXT, digest(RANDOM), offset=0)


def test_incompressible_block_travels_raw() -> None:
    assert compress(RANDOM, Compression.DEFAULT) is None
    assert compress(TEXT, Compression.NONE) is None
    fast = compress(TEXT, Compression.FAST)
    assert fast is not None and decompress(fast, BS) == TEXT


def test_encoder_and_decoder_agree_on_extents_data_and_pass_digest() -> None:
    """What the proxy's encoder frames, the target's decoder hands back checked and decompressed."""
    from tests import frames
    from vmrepl.batch import BatchDecoder, PassDigest

    zero = bytes(BS)
    sent = frames.encoded(0, 0, [TEXT, zero, zero, RANDOM], final=False, compression=Compression.DEFAULT)
    assert sent.data_bytes == 2 * BS and len(sent.frame) < 3 * BS  # TEXT compressed, the zeros merged
    dec = BatchDecoder(disk_size=DISK, block_size=BS, start=0)
    got = dec.receive(sent.frame)
    assert (got.seq, got.start, got.end, got.final, got.data_bytes) == (0, 0, 4 * BS, False, 2 * BS)
    out = got.decode()
    assert [(e.offset, e.length, e.data is None) for e in out.extents] == [
        (0, BS, False),
        (BS, 2 * BS, True),
        (3 * BS, BS, False),
    ]
    assert bytes(out.extents[0].data or b"") == TEXT and bytes(out.extents[2].data or b"") == RANDOM
    expected = (
        PassDigest().add(0, BS, DATA, digest(TEXT)).add(BS, 2 * BS, ZERO, b"").add(3 * BS, BS, DATA, digest(RANDOM))
    )
    assert out.digest == sent.digest == expected
    nxt = dec.receive(frames.data_batch(1, 4 * BS, [RANDOM] * 6, final=True))  # the next batch follows on
    assert nxt.final and nxt.decode().data_bytes == 6 * BS
    with pytest.raises(BatchError, match="expected 2"):
        dec.receive(frames.data_batch(1, 4 * BS, [RANDOM] * 6, final=True))


def test_decode_refuses_data_that_does_not_match_its_digest() -> None:
    from tests import frames
    from vmrepl.batch import BatchDecoder

    frame = frames.raw_batch([frames.extent(0, TEXT, block_digest=digest(RANDOM))], [TEXT], end=BS)
    got = BatchDecoder(disk_size=DISK, block_size=BS, start=0).receive(frame)  # headers are fine
    with pytest.raises(ChecksumMismatch):
        got.decode()


def test_protocol_version_negotiation() -> None:
    from vmrepl.batch import check_chosen_version, choose_version
    from vmrepl.errors import FailedPrecondition

    assert choose_version([]) == 1  # a proxy from before versions
    assert choose_version([1, 2], speaks=(1, 2, 3)) == 2
    with pytest.raises(
        FailedPrecondition, match=r"proxy speaks Transfer protocol version\(s\) 2, 3, this target speaks 1"
    ):
        choose_version([3, 2], speaks=(1,))
    assert check_chosen_version(0) == 1  # a target from before versions answers nothing
    with pytest.raises(FailedPrecondition, match="the target chose Transfer protocol version 4, this proxy speaks 1"):
        check_chosen_version(4)


def test_an_absurd_version_offer_is_refused_in_one_short_line_or_answered_by_the_common_version() -> None:
    """Found by offering every version a 64 KiB open holds: the refusal listed all of them (a status
    message of hundreds of KiB, copied into the target's log)."""
    from vmrepl.batch import MAX_OPEN_BYTES, choose_version
    from vmrepl.errors import FailedPrecondition

    huge = list(range(2, MAX_OPEN_BYTES))
    with pytest.raises(FailedPrecondition) as refused:
        choose_version(huge + huge + [0, 2**32 - 1])
    message = str(refused.value)
    assert len(message) < 300, len(message)
    assert "version(s) 0, 2, 3, 4, 5, 6, 7, 8 and 65528 more, this target speaks 1" in message
    assert choose_version([1] * 100_000 + [0, 2**32 - 1]) == 1  # repeats and strangers around the common one
