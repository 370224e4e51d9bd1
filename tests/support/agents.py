"""In-process fakes of the agents behind controller.engine.agents' interfaces: no sockets, no processes.

They fail the way the gRPC clients do (grpc.aio.AioRpcError with a status code), follow scripts the
test writes, and record what the engine asked, so a test can say what a real agent would have seen.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import TypeAlias

import grpc
from google.protobuf import timestamp_pb2

from controller.engine.agents import ProxyClient, TargetClient
from vmrepl.v1 import common_pb2, proxy_pb2, target_pb2

COMPLETED = proxy_pb2.TRANSFER_STATE_COMPLETED
RUNNING = proxy_pb2.TRANSFER_STATE_RUNNING
FINAL = (proxy_pb2.TRANSFER_STATE_COMPLETED, proxy_pb2.TRANSFER_STATE_FAILED, proxy_pb2.TRANSFER_STATE_CANCELLED)


def rpc_error(code: grpc.StatusCode, details: str = "") -> grpc.aio.AioRpcError:
    """The error a gRPC client raises when the agent (or the channel to it) answers `code`."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details or code.name)


def unavailable() -> grpc.aio.AioRpcError:
    return rpc_error(grpc.StatusCode.UNAVAILABLE, "connection refused")


class Crash:
    """The proxy goes down: the watch breaks (UNAVAILABLE) and it answers nothing until `up` again."""


# One step of a transfer as a watcher sees it: a progress message, an error that breaks the watch, a
# crash, or an event the watch waits for (the transfer is busy until the test, or a cancel, sets it).
Step: TypeAlias = proxy_pb2.TransferProgress | grpc.aio.AioRpcError | Crash | asyncio.Event
Script: TypeAlias = Callable[[proxy_pb2.StartDiskTransferRequest], list[Step]]


def progress(state: proxy_pb2.TransferState.ValueType, offset: int, **fields: object) -> proxy_pb2.TransferProgress:
    return proxy_pb2.TransferProgress(state=state, committed_offset=offset, **fields)  # type: ignore[arg-type]


def completes(request: proxy_pb2.StartDiskTransferRequest) -> list[Step]:
    """A transfer that runs, then completes with the whole disk committed."""
    size = request.source.size
    return [
        progress(RUNNING, size // 2, bytes_read=size // 2, elapsed_seconds=1.0),
        progress(COMPLETED, size, bytes_read=size, bytes_sent=size // 4, passes=1, elapsed_seconds=3.0),
    ]


@dataclass
class FakeTransfer:
    request: proxy_pb2.StartDiskTransferRequest
    steps: list[Step]
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    last: proxy_pb2.TransferProgress | None = None


class FakeAgent:
    """What both fake agents share: an address, and `up` as their health check (calls fail UNAVAILABLE
    while it is false)."""

    def __init__(self, address: str) -> None:
        self._address = address
        self.up = True

    @property
    def address(self) -> str:
        return self._address

    async def healthy(self, *, within: float = 5.0, wait_for_ready: bool = False) -> bool:
        return self.up

    def _check_up(self) -> None:
        if not self.up:
            raise unavailable()


class FakeProxy(FakeAgent):
    """A source proxy: each start runs `script` (default: `completes`); `up` is its health check."""

    def __init__(self, address: str, *, name: str = "proxy", role: str = "proxy", script: Script = completes) -> None:
        super().__init__(address)
        self.name, self.role, self.script = name, role, script
        self.transfers: dict[str, FakeTransfer] = {}
        self.started: list[proxy_pb2.StartDiskTransferRequest] = []
        self.cancelled: list[str] = []
        self.info_asked = 0

    async def start(self, request: proxy_pb2.StartDiskTransferRequest) -> proxy_pb2.StartDiskTransferResponse:
        self._check_up()
        self.started.append(request)
        self.transfers[request.transfer_id] = FakeTransfer(request, list(self.script(request)))
        return proxy_pb2.StartDiskTransferResponse(transfer_id=request.transfer_id)

    async def watch(
        self, transfer_id: str, *, within: float | None = None
    ) -> AsyncGenerator[proxy_pb2.TransferProgress, None]:
        self._check_up()
        t = self.transfers.get(transfer_id)
        if t is None:
            raise rpc_error(grpc.StatusCode.NOT_FOUND, f"no transfer {transfer_id}")
        if t.last is not None:  # a watch starts with the current state
            yield t.last
        while t.steps and (t.last is None or t.last.state not in FINAL):
            step = t.steps.pop(0)
            if isinstance(step, grpc.aio.AioRpcError):
                raise step
            if isinstance(step, Crash):
                self.up = False
                raise unavailable()
            if isinstance(step, asyncio.Event):
                await _first(step, t.cancelled)
                if t.cancelled.is_set():
                    t.steps = [progress(proxy_pb2.TRANSFER_STATE_CANCELLED, t.last.committed_offset if t.last else 0)]
                continue
            t.last = step
            yield step

    async def cancel(self, transfer_id: str) -> None:
        self._check_up()
        self.cancelled.append(transfer_id)
        if transfer_id in self.transfers:
            self.transfers[transfer_id].cancelled.set()

    async def info(self) -> proxy_pb2.AgentInfo:
        self._check_up()
        self.info_asked += 1
        return proxy_pb2.AgentInfo(certificate_name=self.name, role=self.role, version="test")


async def _first(*events: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


@dataclass
class CommitFault:
    error: grpc.aio.AioRpcError
    # The target committed the point before the error reached the caller (its answer was lost).
    committed: bool = False


class FakeTarget(FakeAgent):
    """A target agent keeping replica disks and restore points in memory.

    `prepare_faults` and `commit_faults` are raised by the next calls, one each; `tracking_failed`
    names the disks (replica path, disk id) whose earlier transfer failed sampled verification."""

    def __init__(self, address: str) -> None:
        super().__init__(address)
        self.disks: dict[tuple[str, str], target_pb2.ReplicaDisk] = {}
        self.points: dict[str, list[target_pb2.RestorePoint]] = {}
        self.prepared: list[target_pb2.PrepareReplicaDiskRequest] = []
        self.prepare_faults: list[grpc.aio.AioRpcError] = []
        self.tracking_failed: set[tuple[str, str]] = set()
        self.commits: list[target_pb2.CommitRestorePointRequest] = []
        self.commit_faults: list[CommitFault] = []
        self.deleted: list[tuple[str, str]] = []
        # The size GetReplicaDisk reports for a disk; by default the size it was prepared with.
        self.sizes: dict[tuple[str, str], int] = {}
        # Restore points' disks by (replica path, point id, disk id), as ReadReplicaDisk streams them.
        self.point_disks: dict[tuple[str, str, str], bytes] = {}
        # What VerifyReplica answers per replica path, in order (an error ends the stream); none: nothing.
        self.verify_answers: dict[str, list[common_pb2.VerifyProgress | grpc.aio.AioRpcError]] = {}
        self.verified: list[target_pb2.VerifyReplicaRequest] = []
        self.read_disks: list[target_pb2.ReadReplicaDiskRequest] = []
        self.reads_closed = 0  # verify and read_disk streams closed, whether read to the end or not

    async def prepare(self, request: target_pb2.PrepareReplicaDiskRequest) -> target_pb2.ReplicaDisk:
        self._check_up()
        self.prepared.append(request)
        if self.prepare_faults:
            raise self.prepare_faults.pop(0)
        key = (request.replica_path, request.disk_id)
        disk = target_pb2.ReplicaDisk(
            replica_path=request.replica_path,
            disk_id=request.disk_id,
            disk_size=request.disk_size,
            block_size=request.block_size,
            session_id=request.session_id,
            checkpoint_id=request.checkpoint_id,
            change_tracking_failed=key in self.tracking_failed,
        )
        self.disks[key] = disk
        return disk

    async def get_disk(self, replica_path: str, disk_id: str, *, within: float | None = None) -> target_pb2.ReplicaDisk:
        self._check_up()
        key = (replica_path, disk_id)
        if key not in self.disks:
            raise rpc_error(grpc.StatusCode.NOT_FOUND, f"no replica disk {disk_id}")
        disk = target_pb2.ReplicaDisk()
        disk.CopyFrom(self.disks[key])
        disk.disk_size = self.sizes.get(key, disk.disk_size)
        return disk

    async def commit(
        self, request: target_pb2.CommitRestorePointRequest, *, within: float | None = None
    ) -> target_pb2.RestorePoint:
        self._check_up()
        self.commits.append(request)
        fault = self.commit_faults.pop(0) if self.commit_faults else None
        if fault is not None and not fault.committed:
            raise fault.error
        point = self._commit(request)
        if fault is not None:
            raise fault.error
        return point

    def _commit(self, request: target_pb2.CommitRestorePointRequest) -> target_pb2.RestorePoint:
        points = self.points.setdefault(request.replica_path, [])
        for p in points:  # idempotent per session and checkpoint, as the real target
            if p.session_id == request.session_id and p.checkpoint_id == request.checkpoint_id:
                return p
        created = timestamp_pb2.Timestamp()
        created.GetCurrentTime()
        point = target_pb2.RestorePoint(
            id=f"rp-{request.session_id}-{len(points)}",
            replica_path=request.replica_path,
            session_id=request.session_id,
            checkpoint_id=request.checkpoint_id,
            created_at=created,
        )
        points.append(point)
        return point

    async def list_points(self, replica_path: str) -> list[target_pb2.RestorePoint]:
        self._check_up()
        return list(self.points.get(replica_path, []))

    async def delete_point(self, replica_path: str, point_id: str) -> None:
        self._check_up()
        points = self.points.get(replica_path, [])
        if not any(p.id == point_id for p in points):
            raise rpc_error(grpc.StatusCode.NOT_FOUND, f"no restore point {point_id}")
        self.points[replica_path] = [p for p in points if p.id != point_id]
        self.deleted.append((replica_path, point_id))

    async def verify(self, request: target_pb2.VerifyReplicaRequest) -> AsyncGenerator[common_pb2.VerifyProgress, None]:
        self._check_up()
        self.verified.append(request)
        try:
            self._check_point(request.replica_path, request.restore_point_id)
            for answer in self.verify_answers.get(request.replica_path, []):
                if isinstance(answer, grpc.aio.AioRpcError):
                    raise answer
                yield answer
        finally:
            self.reads_closed += 1

    async def read_disk(self, request: target_pb2.ReadReplicaDiskRequest) -> AsyncGenerator[common_pb2.DiskChunk, None]:
        """The disk's non-zero 1 MiB pieces, then done."""
        self._check_up()
        self.read_disks.append(request)
        try:
            self._check_point(request.replica_path, request.restore_point_id)
            data = self.point_disks.get((request.replica_path, request.restore_point_id, request.disk_id))
            if data is None:
                raise rpc_error(grpc.StatusCode.NOT_FOUND, f"restore point has no disk {request.disk_id}")
            for offset in range(0, len(data), 1 << 20):
                piece = data[offset : offset + (1 << 20)]
                if any(piece):
                    yield common_pb2.DiskChunk(disk_size=len(data), offset=offset, data=piece)
            yield common_pb2.DiskChunk(disk_size=len(data), done=True)
        finally:
            self.reads_closed += 1

    def _check_point(self, replica_path: str, point_id: str) -> None:
        if not any(p.id == point_id for p in self.points.get(replica_path, [])):
            raise rpc_error(grpc.StatusCode.NOT_FOUND, f"restore point {point_id} of {replica_path} does not exist")


class FakeAgents:
    """The engine's `Agents`: the fakes by address (a KeyError for an address no test set up)."""

    def __init__(self, *agents: FakeProxy | FakeTarget) -> None:
        self.proxies = {a.address: a for a in agents if isinstance(a, FakeProxy)}
        self.targets = {a.address: a for a in agents if isinstance(a, FakeTarget)}

    def proxy(self, address: str, server_name: str = "") -> ProxyClient:
        return self.proxies[address]

    def target(self, address: str, server_name: str = "") -> TargetClient:
        return self.targets[address]
