"""One disk's transfer on the agents: prepare the replica disk, sign a ticket, start the transfer on a proxy.

The session engine runs one of these per VM disk; the demo and the
integration tests run it directly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric import ed25519

from controller.engine.agents import ProxyClient, TargetClient
from vmrepl.domain import DEFAULT_BLOCK_SIZE, ChangeMode, Compression, DiskFormat, compare_digests, full_read
from vmrepl.errors import FailedPrecondition, TransferError
from vmrepl.security.ticket import sign_ticket
from vmrepl.v1 import proxy_pb2, target_pb2

TICKET_TTL = 24 * 3600.0  # the longest a ticket lives; a checkpoint's hold deadline cuts it shorter


@dataclass(frozen=True, kw_only=True)
class DiskTaskSpec:
    session_id: str
    # The checkpoint the source is read from: the target resumes a transfer only from the same one.
    checkpoint_id: str
    disk_id: str
    source_locator: str
    source_format: DiskFormat = DiskFormat.RAW
    disk_size: int
    replica_path: str
    block_size: int = DEFAULT_BLOCK_SIZE
    change_source: proxy_pb2.ChangeSource = field(default_factory=full_read)
    exclusions: proxy_pb2.ExclusionSettings = field(default_factory=proxy_pb2.ExclusionSettings)
    compression: Compression = Compression.DEFAULT
    bandwidth_limit_mbps: float = 0.0
    resume_timeout_seconds: int = 0
    target_name: str = "target"
    transfer_id: str = ""
    # An earlier session whose interrupted transfer of this disk this one continues (same checkpoint).
    resume_session_id: str = ""
    # When the ticket expires (Unix seconds): the checkpoint's hold deadline. 0: TICKET_TTL from signing.
    ticket_expires: float = 0.0
    # The replica disk's file format on the target (the job's, see vmrepl.domain.replica_format).
    replica_format: DiskFormat = DiskFormat.RAW


async def proxy_identity(proxy: ProxyClient) -> str:
    """The proxy's certificate name, which its tickets are bound to."""
    info = await proxy.info()
    if info.role != "proxy" or not info.certificate_name:
        raise FailedPrecondition(
            f"the agent at {proxy.address} presents certificate {info.certificate_name!r} with role "
            f"{info.role!r}, not a proxy's"
        )
    return info.certificate_name


def trusted_change(change: proxy_pb2.ChangeSource, disk: target_pb2.ReplicaDisk) -> proxy_pb2.ChangeSource:
    """The change source to use on a prepared disk: changed ranges only while no transfer from this
    checkpoint has failed sampled verification (the target remembers, see ReplicaDisk)."""
    if disk.change_tracking_failed and ChangeMode.of(change) is ChangeMode.RANGES:
        return compare_digests()
    return change


async def prepare(target: TargetClient, spec: DiskTaskSpec) -> target_pb2.ReplicaDisk:
    return await target.prepare(
        target_pb2.PrepareReplicaDiskRequest(
            replica_path=spec.replica_path,
            disk_id=spec.disk_id,
            disk_size=spec.disk_size,
            block_size=spec.block_size,
            session_id=spec.session_id,
            checkpoint_id=spec.checkpoint_id,
            resume_session_id=spec.resume_session_id,
            replica_format=spec.replica_format.to_proto(),
        )
    )


def start_request(
    spec: DiskTaskSpec, *, target_address: str, signing_key: ed25519.Ed25519PrivateKey, proxy: str
) -> proxy_pb2.StartDiskTransferRequest:
    """The request that starts the transfer on `proxy` (its certificate name), with a ticket for it alone."""
    latest = time.time() + TICKET_TTL
    ticket = sign_ticket(
        signing_key,
        session_id=spec.session_id,
        disk_id=spec.disk_id,
        replica_path=spec.replica_path,
        checkpoint_id=spec.checkpoint_id,
        proxy=proxy,
        expires_unix=min(latest, spec.ticket_expires) if spec.ticket_expires else latest,
        audience=spec.target_name,
    )
    return proxy_pb2.StartDiskTransferRequest(
        session_id=spec.session_id,
        disk_id=spec.disk_id,
        source=proxy_pb2.SourceDisk(
            locator=spec.source_locator, format=spec.source_format.to_proto(), size=spec.disk_size
        ),
        block_size=spec.block_size,
        change_source=spec.change_source,
        exclusions=spec.exclusions,
        compression=spec.compression.to_proto(),
        bandwidth_limit_mbps=spec.bandwidth_limit_mbps,
        target=proxy_pb2.TargetEndpoint(address=target_address),
        ticket=ticket,
        resume_timeout_seconds=spec.resume_timeout_seconds,
        replica_path=spec.replica_path,
        transfer_id=spec.transfer_id,
        checkpoint_id=spec.checkpoint_id,
    )


async def run_disk_task(
    *,
    proxy: ProxyClient,
    target: TargetClient,
    spec: DiskTaskSpec,
    signing_key: ed25519.Ed25519PrivateKey,
    on_progress: Callable[[proxy_pb2.TransferProgress], None] | None = None,
) -> proxy_pb2.TransferProgress:
    """Replicate one disk; returns the final progress. Raises TransferError unless it completed."""
    disk = await prepare(target, spec)
    spec = dataclasses.replace(spec, change_source=trusted_change(spec.change_source, disk))
    request = start_request(
        spec, target_address=target.address, signing_key=signing_key, proxy=await proxy_identity(proxy)
    )
    started = await proxy.start(request)
    last: proxy_pb2.TransferProgress | None = None
    async with contextlib.aclosing(proxy.watch(started.transfer_id)) as progresses:
        async for progress in progresses:
            last = progress
            if on_progress is not None:
                on_progress(progress)
    if last is None or last.state != proxy_pb2.TRANSFER_STATE_COMPLETED:
        state = proxy_pb2.TransferState.Name(last.state) if last else "unknown"
        detail = f"{last.error_code}: {last.error_message}" if last and last.error_message else ""
        raise TransferError(f"disk {spec.disk_id} ended {state} {detail}".strip())
    return last
