"""Checking a StartDiskTransfer request and turning it into a transfer plan."""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from proxy_agent.plan import Plan, make_plan
from vmrepl.disk import DiskReader, open_reader
from vmrepl.disk.fileio import IS_WINDOWS
from vmrepl.disk.vhdx import VhdxReader
from vmrepl.domain import DEFAULT_BLOCK_SIZE, ChangeMode, Compression, DiskFormat, check_block_size
from vmrepl.errors import FailedPrecondition, InvalidArgument, PathError
from vmrepl.extent import Extent
from vmrepl.host_paths import Mapping, chain_roots, is_host_path, map_host_path
from vmrepl.names import check_name, check_replica_path
from vmrepl.security.ticket import MAX_TICKET_BYTES
from vmrepl.v1 import common_pb2, proxy_pb2

MAX_RANGES = 1_000_000


def source_path(locator: str, roots: Sequence[Path], host_paths: Sequence[Mapping] = ()) -> Path:
    r"""Where the proxy reads the disk a locator names. A Hyper-V host path (`C:\...`, `\\server\share\...`)
    goes through the `host_paths` mapping whose prefix is its longest (vmrepl.host_paths) and must then
    name a regular file below that mapping's local folder, and inside a source root if any is set; with no
    mapping it is refused, except on Windows, where it is a local path like any other. A local path must name
    a regular file inside a source root.

    Either way no symbolic link is passed below the folder (local or root): whoever can write a VM folder
    could otherwise swap a disk image for a link to another VM's disk, or to the file provider's sealing key,
    after the provider checked it and before the proxy reads it (a held checkpoint is read hours later)."""
    if not locator:
        raise InvalidArgument("source.locator", "is required")
    if is_host_path(locator):
        mapped = map_host_path(locator, host_paths, field="source.locator")
        if mapped is not None:
            path, mapping = mapped
            _no_links_below(mapping.local, path)
            if roots:
                _inside_roots(path, roots)
            return path
        if not IS_WINDOWS:
            raise FailedPrecondition(
                f"source disk {locator!r} is a path on the Hyper-V host and no entry of this proxy's "
                "`host_paths` configuration (host_prefix -> local) maps it: add the folder it is in "
                "(an off-host proxy: where it mounts the host's share)"
            )
    path = Path(locator)
    if not path.is_absolute():
        raise PathError("source.locator", "must be an absolute path")
    return _inside_roots(Path(os.path.normpath(path)), roots)


def _inside_roots(path: Path, roots: Sequence[Path]) -> Path:
    for root in roots:
        for base in dict.fromkeys((Path(os.path.normpath(root)), Path(os.path.realpath(root)))):
            if base in path.parents:
                _no_links_below(base, path)
                return path
    raise PathError(
        "source.locator",
        f"{str(path)!r} is outside the proxy's source roots: add the folder holding it to this proxy's "
        "`source_roots` (a failback reads the failed-over VM in the failover host's folder, the target's vm_root)",
    )


def open_source(
    fmt: DiskFormat, locator: str, path: Path, *, host_paths: Sequence[Mapping], roots: Sequence[Path]
) -> DiskReader:
    """The disk reader. A VHDX named by a host path may be a checkpoint's differencing disk: its parents are
    looked for inside the mapped folders only (narrowed to the source roots), the relative locator first,
    then the absolute one through the same mappings."""
    if fmt is not DiskFormat.VHDX or not is_host_path(locator):
        return open_reader(fmt, path)

    def parent(value: str) -> Path | None:
        if not is_host_path(value):
            return None
        mapped = map_host_path(value, host_paths, field="parent locator")
        if mapped is not None:
            return mapped[0]
        return Path(value) if IS_WINDOWS else None

    return VhdxReader(path, follow_links=True, roots=chain_roots(host_paths, roots), resolve_win32=parent)


def _no_links_below(base: Path, path: Path) -> None:
    at = base
    for part in path.relative_to(base).parts:
        at = at / part
        try:
            mode = os.lstat(at).st_mode
        except OSError as e:
            raise FailedPrecondition(f"source disk {path} cannot be read: {e.strerror}") from e
        if stat.S_ISLNK(mode):
            raise PathError("source.locator", f"passes through a symbolic link ({at}); links are not followed")
    if not stat.S_ISREG(mode):
        raise PathError("source.locator", f"{path} is not a regular file")


def disk_format(req: proxy_pb2.StartDiskTransferRequest) -> DiskFormat:
    return DiskFormat.from_proto("source.format", req.source.format)


def block_size(req: proxy_pb2.StartDiskTransferRequest) -> int:
    return check_block_size("block_size", req.block_size or DEFAULT_BLOCK_SIZE)


def compression(req: proxy_pb2.StartDiskTransferRequest) -> Compression:
    return Compression.from_proto("compression", req.compression)


def bandwidth(req: proxy_pb2.StartDiskTransferRequest) -> float:
    mbps = req.bandwidth_limit_mbps
    if not math.isfinite(mbps) or mbps < 0:
        raise InvalidArgument("bandwidth_limit_mbps", "must be a non-negative number")
    return mbps * 1e6


def _ranges(field: str, ranges: list[common_pb2.ByteRange], disk_size: int) -> list[Extent]:
    if len(ranges) > MAX_RANGES:
        raise InvalidArgument(field, f"more than {MAX_RANGES} ranges")
    out = []
    for i, r in enumerate(ranges):
        if r.length == 0 or r.offset + r.length > disk_size:
            raise InvalidArgument(f"{field}[{i}]", f"[{r.offset}, +{r.length}) is empty or past the disk end")
        out.append(Extent(r.offset, r.length))
    return out


def check_exclusions(ex: proxy_pb2.ExclusionSettings) -> None:
    g = ex.guest
    if g.skip_swap or g.skip_pagefile or g.skip_hibernation or g.skip_deleted or g.guest_paths:
        raise FailedPrecondition(
            "guest file-system exclusions need the guest file-system reader, "
            "which this proxy does not have yet; "
            "pass byte ranges in exclusions.ranges"
        )


@dataclass(frozen=True, slots=True)
class Plans:
    mode: ChangeMode
    first: Plan
    # Every allocated block, for a digest-comparison re-run after a failed sampled verification.
    full: Callable[[], Plan]
    # A full check (a comparison with CompareDigests.full_check): the host's changed ranges; None otherwise.
    full_check: list[Extent] | None = None


def plans_for(req: proxy_pb2.StartDiskTransferRequest, *, disk_size: int, allocated: list[Extent]) -> Plans:
    mode = ChangeMode.of(req.change_source)
    changed = None
    if mode is ChangeMode.RANGES:
        changed = _ranges(
            "change_source.changed_ranges.ranges", list(req.change_source.changed_ranges.ranges), disk_size
        )
    full_check = None
    if mode is ChangeMode.COMPARE and req.change_source.compare_digests.HasField("full_check"):
        full_check = _ranges(
            "change_source.compare_digests.full_check.ranges",
            list(req.change_source.compare_digests.full_check.ranges),
            disk_size,
        )
    check_exclusions(req.exclusions)
    excluded = _ranges("exclusions.ranges", list(req.exclusions.ranges), disk_size)
    bs = block_size(req)

    def plan(ranges: list[Extent] | None) -> Plan:
        return make_plan(disk_size=disk_size, block_size=bs, allocated=allocated, changed=ranges, excluded=excluded)

    return Plans(mode=mode, first=plan(changed), full=lambda: plan(None), full_check=full_check)


def check_identity(req: proxy_pb2.StartDiskTransferRequest) -> None:
    for field in ("session_id", "disk_id", "checkpoint_id"):
        check_name(field, getattr(req, field))
    check_replica_path("replica_path", req.replica_path)
    if not req.target.address:
        raise InvalidArgument("target.address", "is required")
    if not req.ticket or len(req.ticket) > MAX_TICKET_BYTES:
        raise InvalidArgument("ticket", f"is required and at most {MAX_TICKET_BYTES} bytes")
    if req.source.size == 0:
        raise InvalidArgument("source.size", "is required")
