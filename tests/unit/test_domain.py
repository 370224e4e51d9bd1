"""The shared rules and the wire <-> domain mapping (vmrepl.domain)."""

import grpc
import pytest

from vmrepl import domain
from vmrepl.domain import ChangeMode, ChangeTracking, Compression, DiskFormat
from vmrepl.errors import InvalidArgument
from vmrepl.v1 import common_pb2, proxy_pb2


def test_every_wire_disk_format_maps_both_ways() -> None:
    wire = {v for k, v in common_pb2.DiskFormat.items() if v != common_pb2.DISK_FORMAT_UNSPECIFIED}
    assert {f.to_proto() for f in DiskFormat} == wire
    for f in DiskFormat:
        assert DiskFormat.from_proto("source.format", f.to_proto()) is f
    with pytest.raises(InvalidArgument, match=r"source\.format"):
        DiskFormat.from_proto("source.format", common_pb2.DISK_FORMAT_UNSPECIFIED)


def test_every_wire_compression_maps_both_ways() -> None:
    wire = {v for k, v in proxy_pb2.CompressionLevel.items() if v != proxy_pb2.COMPRESSION_LEVEL_UNSPECIFIED}
    assert {c.to_proto() for c in Compression} == wire
    for c in Compression:
        assert Compression.from_proto("compression", c.to_proto()) is c
    assert Compression.from_proto("compression", proxy_pb2.COMPRESSION_LEVEL_UNSPECIFIED) is Compression.DEFAULT
    with pytest.raises(InvalidArgument, match="compression"):
        Compression.from_proto("compression", 99)  # type: ignore[arg-type]


def test_job_settings_parse_with_defaults_and_name_the_field() -> None:
    assert Compression.parse("job.compression", "") is domain.JOB_DEFAULTS.compression
    assert Compression.parse("job.compression", "fast") is Compression.FAST
    assert ChangeTracking.parse("job.change_tracking", "") is ChangeTracking.AUTO
    with pytest.raises(InvalidArgument, match=r"job.compression: must be one of none, fast, default"):
        Compression.parse("job.compression", "zstd")
    with pytest.raises(InvalidArgument, match=r"job.change_tracking: must be one of auto, on, off"):
        ChangeTracking.parse("job.change_tracking", "sometimes")


def test_change_mode_of_every_change_source() -> None:
    oneofs = {f.name for f in proxy_pb2.ChangeSource.DESCRIPTOR.oneofs_by_name["mode"].fields}
    sources = {
        "full": domain.full_read(),
        "changed_ranges": proxy_pb2.ChangeSource(changed_ranges=proxy_pb2.ChangedRanges()),
        "compare_digests": domain.compare_digests(),
    }
    assert set(sources) == oneofs  # a new oneof member needs a mode here
    assert [ChangeMode.of(sources[k]) for k in ("full", "changed_ranges", "compare_digests")] == list(ChangeMode)
    assert ChangeMode.of(proxy_pb2.ChangeSource()) is ChangeMode.FULL


def test_transfer_ended_states() -> None:
    assert proxy_pb2.TRANSFER_STATE_RUNNING not in domain.TRANSFER_ENDED
    assert proxy_pb2.TRANSFER_STATE_RECONNECTING not in domain.TRANSFER_ENDED
    assert len(domain.TRANSFER_ENDED) == 3


def test_status_policy() -> None:
    assert domain.retryable(grpc.StatusCode.UNAVAILABLE)
    assert domain.retryable(grpc.StatusCode.RESOURCE_EXHAUSTED)  # admission: try again later
    assert not domain.retryable(grpc.StatusCode.PERMISSION_DENIED)
    assert not domain.retryable(grpc.StatusCode.DATA_LOSS)
    assert domain.unreachable(grpc.StatusCode.DEADLINE_EXCEEDED)
    assert not domain.unreachable(grpc.StatusCode.NOT_FOUND)
    # An agent out of reach is always worth asking again.
    assert all(domain.retryable(c) for c in domain.UNREACHABLE_STATUSES)


@pytest.mark.parametrize(("size", "ok"), [(64 << 10, True), (1 << 20, True), (16 << 20, True), (32 << 10, False),
                                          (32 << 20, False), (3 << 20, False), (0, False)])  # fmt: skip
def test_block_size_rule(size: int, ok: bool) -> None:
    assert domain.valid_block_size(size) is ok
    if ok:
        assert domain.check_block_size("block_size", size) == size
    else:
        with pytest.raises(InvalidArgument, match=r"block_size: must be a power of two from 64 KiB to 16 MiB"):
            domain.check_block_size("block_size", size)


def test_disk_size_and_limits() -> None:
    assert domain.check_disk_size("disk_size", domain.MAX_DISK_SIZE) == domain.MAX_DISK_SIZE
    for bad in (0, domain.MAX_DISK_SIZE + 1):
        with pytest.raises(InvalidArgument, match="disk_size: must be between 1 and"):
            domain.check_disk_size("disk_size", bad)
    assert domain.KEEP_LIMIT.check("k", domain.JOB_DEFAULTS.restore_points_to_keep) == 7
    with pytest.raises(InvalidArgument, match=r"job\.retries: must be from 0 to 10"):
        domain.RETRIES_LIMIT.check("job.retries", 11)
    assert domain.FULL_CHECK_EVERY_LIMIT.check("job.full_check_every", domain.JOB_DEFAULTS.full_check_every) == 10
    assert domain.FULL_CHECK_EVERY_LIMIT.check("job.full_check_every", 0) == 0  # never
    with pytest.raises(InvalidArgument, match=r"job\.full_check_every: must be from 0 \(never\) to 1000"):
        domain.FULL_CHECK_EVERY_LIMIT.check("job.full_check_every", 1001)
    assert domain.SLOTS_LIMIT.check("proxy.max_tasks", domain.DEFAULT_SLOTS) == 4
    assert domain.valid_block_size(domain.JOB_DEFAULTS.block_size)
