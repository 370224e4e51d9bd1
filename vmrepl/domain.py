"""The shared rules of replication, and the mapping between wire values and domain values. Pure.

Every program (controller, proxy, target, CLI) takes these from here: disk formats, compression levels,
change modes, the change-tracking setting, the transfer states that end a transfer, which gRPC statuses are
worth another attempt, the block-size rule, the largest disk, and a job's defaults and limits. The protobuf
enums stay the wire form; code past the RPC edge works with the enums below, converted here in one place.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TypeVar

import grpc

from vmrepl.errors import InvalidArgument
from vmrepl.extent import KiB, MiB
from vmrepl.v1 import common_pb2, proxy_pb2

_E = TypeVar("_E", bound=enum.StrEnum)


class DiskFormat(enum.StrEnum):
    """Container format of a source disk image."""

    RAW = "raw"
    VHDX = "vhdx"
    VHD = "vhd"
    # vmrepl's differencing layer over a base image (vmrepl/disk/layer.py): a failed-over VM's disks on a
    # file host, written after failover without touching the point under them.
    LAYER = "layer"

    def to_proto(self) -> common_pb2.DiskFormat.ValueType:
        return _FORMAT_TO_PROTO[self]

    @classmethod
    def from_proto(cls, field: str, value: common_pb2.DiskFormat.ValueType) -> DiskFormat:
        for fmt, wire in _FORMAT_TO_PROTO.items():
            if wire == value:
                return fmt
        raise InvalidArgument(field, f"is required: one of {', '.join(f.value for f in cls)}")


_FORMAT_TO_PROTO = {
    DiskFormat.RAW: common_pb2.DISK_FORMAT_RAW,
    DiskFormat.VHDX: common_pb2.DISK_FORMAT_VHDX,
    DiskFormat.VHD: common_pb2.DISK_FORMAT_VHD,
    DiskFormat.LAYER: common_pb2.DISK_FORMAT_LAYER,
}


class PowerState(enum.StrEnum):
    """Whether a VM runs, as providers report it (VmInfo.power): failover starts and stops VMs, planned
    failover and failback need the source or original VM off."""

    RUNNING = "running"
    OFF = "off"
    # Saved, paused, starting, stopping, or a state the host did not name: neither running nor safely off.
    OTHER = "other"


# The formats a replica disk is written in (a VHD replica is never made: its 2 TiB limit and its lack of
# checksums make it no place to keep a copy).
REPLICA_FORMATS = (DiskFormat.RAW, DiskFormat.VHDX)


def replica_format(setting: str, *, host_provider: str) -> DiskFormat:
    """A job's replica format: its setting ("raw", "vhdx"), or when unset the host's own: VHDX for Hyper-V
    hosts (their VMs can be started from the replica as it is), raw for file-backed ones."""
    if setting:
        return DiskFormat(setting)
    return DiskFormat.VHDX if host_provider == "hyperv" else DiskFormat.RAW


class Consistency(enum.StrEnum):
    """How consistent a restore point's disks are: as after a power cut, or with the guest's applications
    quiesced (VSS) for the checkpoint."""

    CRASH = "crash"
    APPLICATION = "application"

    def to_proto(self) -> common_pb2.Consistency.ValueType:
        return _CONSISTENCY_TO_PROTO[self]

    @classmethod
    def from_stored(cls, value: str) -> common_pb2.Consistency.ValueType:
        """The wire value of a stored consistency; a row from before points kept one: unspecified."""
        return cls(value).to_proto() if value in cls._value2member_map_ else common_pb2.CONSISTENCY_UNSPECIFIED


_CONSISTENCY_TO_PROTO = {
    Consistency.CRASH: common_pb2.CONSISTENCY_CRASH,
    Consistency.APPLICATION: common_pb2.CONSISTENCY_APPLICATION,
}


class Compression(enum.StrEnum):
    """How the proxy compresses data blocks: off, lz4 with a high acceleration, or lz4's default."""

    NONE = "none"
    FAST = "fast"
    DEFAULT = "default"

    def to_proto(self) -> proxy_pb2.CompressionLevel.ValueType:
        return _COMPRESSION_TO_PROTO[self]

    @classmethod
    def from_proto(cls, field: str, value: proxy_pb2.CompressionLevel.ValueType) -> Compression:
        if value == proxy_pb2.COMPRESSION_LEVEL_UNSPECIFIED:  # the proxy's default
            return cls.DEFAULT
        for level, wire in _COMPRESSION_TO_PROTO.items():
            if wire == value:
                return level
        raise InvalidArgument(field, f"unknown level {value}")

    @classmethod
    def parse(cls, field: str, value: str) -> Compression:
        """A job's setting as the API and the CLI take it; empty: the default."""
        return _parse(cls, field, value or JOB_DEFAULTS.compression)


_COMPRESSION_TO_PROTO = {
    Compression.NONE: proxy_pb2.COMPRESSION_LEVEL_NONE,
    Compression.FAST: proxy_pb2.COMPRESSION_LEVEL_FAST,
    Compression.DEFAULT: proxy_pb2.COMPRESSION_LEVEL_DEFAULT,
}


class ChangeMode(enum.StrEnum):
    """Which blocks a transfer reads (the ChangeSource oneof on the wire)."""

    FULL = "full"  # every allocated block
    RANGES = "ranges"  # changed ranges since a reference, from the provider's change tracking
    COMPARE = "compare"  # every allocated block, hashed and compared with the replica's digests

    @classmethod
    def of(cls, source: proxy_pb2.ChangeSource) -> ChangeMode:
        """The mode of a ChangeSource; one that sets none reads everything."""
        return _ONEOF_TO_MODE[source.WhichOneof("mode") or "full"]


_ONEOF_TO_MODE = {"full": ChangeMode.FULL, "changed_ranges": ChangeMode.RANGES, "compare_digests": ChangeMode.COMPARE}


def compare_digests() -> proxy_pb2.ChangeSource:
    return proxy_pb2.ChangeSource(compare_digests=proxy_pb2.CompareDigests())


def full_read() -> proxy_pb2.ChangeSource:
    return proxy_pb2.ChangeSource(full=proxy_pb2.FullRead())


class ChangeTracking(enum.StrEnum):
    """A job's use of the host's change tracking."""

    AUTO = "auto"  # changed ranges when the host can report them, else digest comparison
    ON = "on"  # required: a disk whose changes cannot be reported fails
    OFF = "off"  # digest comparison

    @classmethod
    def parse(cls, field: str, value: str) -> ChangeTracking:
        return _parse(cls, field, value or JOB_DEFAULTS.change_tracking)


def _parse(kind: type[_E], field: str, value: str) -> _E:
    try:
        return kind(value)
    except ValueError:
        raise InvalidArgument(field, f"must be one of {', '.join(e.value for e in kind)}") from None


# A transfer in one of these states has ended: WatchTransfer sends it last, the proxy may forget it.
TRANSFER_ENDED = frozenset(
    {proxy_pb2.TRANSFER_STATE_COMPLETED, proxy_pb2.TRANSFER_STATE_FAILED, proxy_pb2.TRANSFER_STATE_CANCELLED}
)

# Statuses after which asking again cannot succeed: the request, the caller or the data is wrong.
PERMANENT_STATUSES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.DATA_LOSS,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.ALREADY_EXISTS,
    }
)
# Statuses that say the agent is (for now) out of reach, rather than that it refused.
UNREACHABLE_STATUSES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


def retryable(code: grpc.StatusCode) -> bool:
    """A broken stream or call with this status may succeed when tried again (after a backoff)."""
    return code not in PERMANENT_STATUSES


def unreachable(code: grpc.StatusCode) -> bool:
    """The agent did not answer: the caller may look for another one, or wait for it."""
    return code in UNREACHABLE_STATUSES


# A VM's configuration as its provider captured it, kept with each restore point (target.proto
# CommitRestorePointRequest.vm_configuration): the target refuses more, a provider must not capture more.
MAX_VM_CONFIGURATION = 1 * MiB

MIN_BLOCK_SIZE = 64 * KiB
MAX_BLOCK_SIZE = 16 * MiB
DEFAULT_BLOCK_SIZE = 1 * MiB
BLOCK_SIZE_RULE = "must be a power of two from 64 KiB to 16 MiB"


def valid_block_size(block_size: int) -> bool:
    return MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE and block_size & (block_size - 1) == 0


def check_block_size(field: str, block_size: int) -> int:
    if not valid_block_size(block_size):
        raise InvalidArgument(field, BLOCK_SIZE_RULE)
    return block_size


# One ReadDigests call answers at most this many blocks: 16 MiB of digests, 1 TiB of disk at 1 MiB blocks. It bounds
# the target's work per call (a 1 PiB disk of 64 KiB blocks would otherwise be 256 GiB of digests in one call);
# a caller pages through a larger disk with first_block.
# Replica reads relayed by the controller (VerifyJobReplica, ExportRestorePoint) open at once, per caller
# (certificate name) and in total: each holds a target's read slot and its disks' time.
MAX_REPLICA_READS_PER_CALLER = 2
MAX_REPLICA_READS = 8
MAX_DIGESTS_PER_CALL = 1 << 20


def check_digest_count(field: str, count: int) -> int:
    if count > MAX_DIGESTS_PER_CALL:
        raise InvalidArgument(field, f"must be at most {MAX_DIGESTS_PER_CALL} blocks per call; page with first_block")
    return count


# WinRM script calls (one shell each) open at once against one Hyper-V host, and in total: a flood of ListHostVms or
# sessions queues here instead of opening shells past the host's MaxShellsPerUser (30 by default) or holding every
# thread of the controller. The calls run in their own thread pool of MAX_WINRM_CALLS threads.
MAX_WINRM_CALLS_PER_HOST = 4
MAX_WINRM_CALLS = 32


def check_sample_percent(field: str, percent: int) -> int:
    """A verification's share of blocks: 1 to 100, 0 meaning 100 (every block)."""
    if not 0 <= percent <= 100:
        raise InvalidArgument(field, f"{percent} is not a percentage of blocks (1 to 100; 0 means 100)")
    return percent or 100


# 1 PiB: far beyond any VHDX (64 TB), small enough that offsets stay sane.
MAX_DISK_SIZE = 1 << 50


def check_disk_size(field: str, disk_size: int) -> int:
    if not 0 < disk_size <= MAX_DISK_SIZE:
        raise InvalidArgument(field, f"must be between 1 and {MAX_DISK_SIZE}")
    return disk_size


@dataclass(frozen=True, slots=True)
class Limit:
    """An inclusive range a setting must fall in, and how the API words it."""

    low: int
    high: int
    words: str

    def check(self, field: str, value: int) -> int:
        if not self.low <= value <= self.high:
            raise InvalidArgument(field, f"must be from {self.words}")
        return value


@dataclass(frozen=True, slots=True, kw_only=True)
class JobDefaults:
    """What a job gets for a setting it leaves out (API, CLI and database alike)."""

    restore_points_to_keep: int = 7
    compression: Compression = Compression.DEFAULT
    block_size: int = DEFAULT_BLOCK_SIZE
    change_tracking: ChangeTracking = ChangeTracking.AUTO
    checkpoint_hold_seconds: int = 24 * 3600
    retries: int = 2
    retry_wait_seconds: int = 60
    # Every this many sessions an incremental compares every block's digest instead of trusting the host's
    # changed ranges (a periodic full check); 0: never.
    full_check_every: int = 10


JOB_DEFAULTS = JobDefaults()
KEEP_LIMIT = Limit(1, 1000, "1 to 1000")
CHECKPOINT_HOLD_LIMIT = Limit(60, 30 * 24 * 3600, "60 to 2592000 (30 days)")
RETRIES_LIMIT = Limit(0, 10, "0 to 10")
RETRY_WAIT_LIMIT = Limit(0, 24 * 3600, "0 to 86400")
FULL_CHECK_EVERY_LIMIT = Limit(0, 1000, "0 (never) to 1000")

# Disk tasks an agent (proxy or target) runs at once: its slots.
DEFAULT_SLOTS = 4
SLOTS_LIMIT = Limit(1, 64, "1 to 64")
