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


@dataclass(kw_only=True)
class FakeReplica:
    """A VM replica's state between restore points, as the target keeps it (common.proto ReplicaState):
    a prepare makes it WRITING for its session (rolling back first a session it does not continue), a
    commit AT_POINT, EndReplicaSession RESUMABLE or rolled back."""

    state: common_pb2.ReplicaState.ValueType = common_pb2.REPLICA_STATE_EMPTY
    session_id: str = ""
    rolled_back_session_id: str = ""
    rolled_back_at: timestamp_pb2.Timestamp | None = None


WRITING, RESUMABLE = common_pb2.REPLICA_STATE_WRITING, common_pb2.REPLICA_STATE_RESUMABLE


class FakeTarget(FakeAgent):
    """A target agent keeping replica disks, restore points and replica states in memory.

    `prepare_faults`, `commit_faults` and `end_faults` are raised by the next calls, one each;
    `tracking_failed` names the disks (replica path, disk id) whose earlier transfer failed sampled
    verification; `rollbacks` records each rollback as (replica path, session id)."""

    def __init__(self, address: str) -> None:
        super().__init__(address)
        self.disks: dict[tuple[str, str], target_pb2.ReplicaDisk] = {}
        self.points: dict[str, list[target_pb2.RestorePoint]] = {}
        self.replicas: dict[str, FakeReplica] = {}
        self.ended: list[target_pb2.EndReplicaSessionRequest] = []
        self.end_faults: list[BaseException] = []
        self.rollbacks: list[tuple[str, str]] = []
        # GetReplica and RollbackReplica wait for this while it is set and not yet released.
        self.replica_gate: asyncio.Event | None = None
        self.in_flight = self.most_in_flight = 0
        self.entered = asyncio.Event()  # set each time a call reaches the gate
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
        # Failover: mounts by id as MountPoint made them; `mount_faults` raised by the next call of a method
        # (by name: "mount_point", "unmount_point", ...), one each; `calls` every mount call in order.
        self.mounts: dict[str, target_pb2.Mount] = {}
        self.mount_faults: dict[str, list[grpc.aio.AioRpcError]] = {}
        self.mount_calls: list[tuple[str, str]] = []
        self.deleted_replicas: list[str] = []
        self.removed_created: list[str] = []  # DeleteReplica calls that removed the images a failback made
        self.failback_disks: list[target_pb2.PrepareFailbackDiskRequest] = []

    async def prepare(self, request: target_pb2.PrepareReplicaDiskRequest) -> target_pb2.ReplicaDisk:
        self._check_up()
        self.prepared.append(request)
        if self.prepare_faults:
            raise self.prepare_faults.pop(0)
        key = (request.replica_path, request.disk_id)
        fmt = request.replica_format or common_pb2.DISK_FORMAT_RAW
        if key in self.disks and self.disks[key].replica_format != fmt:
            raise rpc_error(grpc.StatusCode.FAILED_PRECONDITION, f"replica disk {request.disk_id} is in another format")
        replica = self.replicas.setdefault(request.replica_path, FakeReplica())
        if replica.state in (WRITING, RESUMABLE) and replica.session_id not in (
            request.session_id,
            request.resume_session_id,
        ):
            self._roll_back(request.replica_path)  # a session that does not continue it: back to the point first
        replica.state, replica.session_id = WRITING, request.session_id
        disk = target_pb2.ReplicaDisk(
            replica_format=fmt,
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
        disks = [self.disks[(request.replica_path, d)] for d in request.disk_ids]
        point = target_pb2.RestorePoint(
            id=f"rp-{request.session_id}-{len(points)}",
            replica_path=request.replica_path,
            session_id=request.session_id,
            checkpoint_id=request.checkpoint_id,
            created_at=created,
            change_reference=request.change_reference,
            consistency=request.consistency,
            restorable=True,
            disks=[
                common_pb2.RestorePointDisk(disk_id=d.disk_id, disk_size=d.disk_size, format=d.replica_format)
                for d in disks
            ],
        )
        points.append(point)
        earlier = self.replicas.get(request.replica_path) or FakeReplica()
        self.replicas[request.replica_path] = FakeReplica(
            state=common_pb2.REPLICA_STATE_AT_POINT,
            rolled_back_session_id=earlier.rolled_back_session_id,  # the last rollback stays on record
            rolled_back_at=earlier.rolled_back_at,
        )
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

    def replica(self, replica_path: str) -> target_pb2.Replica:
        r = self.replicas.get(replica_path)
        if r is None:
            raise rpc_error(grpc.StatusCode.NOT_FOUND, f"no replica {replica_path}")
        points = self.points.get(replica_path, [])
        return target_pb2.Replica(
            replica_path=replica_path,
            state=r.state,
            session_id=r.session_id,
            base_point_id=points[-1].id if points else "",
            rolled_back_session_id=r.rolled_back_session_id,
            rolled_back_at=r.rolled_back_at,
            restore_points=points,
        )

    def _roll_back(self, replica_path: str) -> None:
        r = self.replicas[replica_path]
        self.rollbacks.append((replica_path, r.session_id))
        at = timestamp_pb2.Timestamp()
        at.GetCurrentTime()
        at_point = bool(self.points.get(replica_path))
        state = common_pb2.REPLICA_STATE_AT_POINT if at_point else common_pb2.REPLICA_STATE_EMPTY
        self.replicas[replica_path] = FakeReplica(state=state, rolled_back_session_id=r.session_id, rolled_back_at=at)

    async def _gate(self) -> None:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        self.entered.set()
        try:
            if self.replica_gate is not None:
                await self.replica_gate.wait()
        finally:
            self.in_flight -= 1

    async def at_gate(self, calls: int) -> None:
        """Until `calls` calls wait at the replica gate."""
        while self.in_flight < calls:
            self.entered.clear()
            await self.entered.wait()

    async def get_replica(self, replica_path: str, *, within: float | None = None) -> target_pb2.Replica:
        self._check_up()
        await self._gate()
        return self.replica(replica_path)

    async def end_session(
        self, request: target_pb2.EndReplicaSessionRequest, *, within: float | None = None
    ) -> target_pb2.Replica:
        """As the target: idempotent; a session that is not the replica's (nor the one it last rolled
        back) is refused with FAILED_PRECONDITION."""
        self._check_up()
        self.ended.append(request)
        if self.end_faults:
            raise self.end_faults.pop(0)
        r = self.replicas.get(request.replica_path)
        if r is None:
            raise rpc_error(grpc.StatusCode.NOT_FOUND, f"no replica {request.replica_path}")
        if r.state not in (WRITING, RESUMABLE) or r.session_id != request.session_id:
            if not request.keep_for_resume and r.rolled_back_session_id == request.session_id:
                return self.replica(request.replica_path)  # rolled back already: asked again
            raise rpc_error(grpc.StatusCode.FAILED_PRECONDITION, f"session {request.session_id} is not the replica's")
        if request.keep_for_resume:
            r.state = RESUMABLE
        else:
            self._roll_back(request.replica_path)
        return self.replica(request.replica_path)

    async def rollback(self, replica_path: str, *, within: float | None = None) -> target_pb2.Replica:
        self._check_up()
        await self._gate()
        r = self.replicas.get(replica_path)
        if r is None:
            raise rpc_error(grpc.StatusCode.NOT_FOUND, f"no replica {replica_path}")
        if r.state in (WRITING, RESUMABLE):
            self._roll_back(replica_path)
        return self.replica(replica_path)

    def _mount_call(self, method: str, key: str) -> None:
        self._check_up()
        self.mount_calls.append((method, key))
        faults = self.mount_faults.get(method)
        if faults:
            raise faults.pop(0)

    async def mount_point(self, request: target_pb2.MountPointRequest) -> target_pb2.Mount:
        self._mount_call("mount_point", request.mount_id)
        if request.mount_id in self.mounts and self.mounts[request.mount_id].state != target_pb2.MOUNT_STATE_GONE:
            return self.mounts[request.mount_id]
        points = self.points.get(request.replica_path, [])
        wanted = request.point_id or (points[-1].id if points else "")
        point = next((p for p in points if p.id == wanted), None)
        if point is None:
            raise rpc_error(
                grpc.StatusCode.NOT_FOUND, f"no restore point {request.point_id!r} of {request.replica_path}"
            )
        layer = request.layout == target_pb2.MOUNT_LAYOUT_LAYER
        own = sorted(
            (d for (path, _), d in self.disks.items() if path == request.replica_path), key=lambda d: d.disk_id
        )
        disks = [
            target_pb2.MountDisk(
                disk_id=d.disk_id,
                path=f"{d.disk_id}.layer" if layer else f"{d.disk_id}.vhdx",
                format=common_pb2.DISK_FORMAT_LAYER if layer else common_pb2.DISK_FORMAT_VHDX,
                size=d.disk_size,
            )
            for d in own
        ]
        mount = target_pb2.Mount(
            mount_id=request.mount_id,
            replica_path=request.replica_path,
            point_id=point.id,
            kind=request.kind,
            layout=request.layout,
            state=target_pb2.MOUNT_STATE_MOUNTED,
            folder=request.mount_id,
            host_folder=f"D:\\vms\\{request.mount_id}",
            disks=disks,
            bytes_copied=0 if point is points[-1] else 4096,
        )
        self.mounts[request.mount_id] = mount
        return mount

    async def get_mount(self, mount_id: str) -> target_pb2.Mount:
        self._mount_call("get_mount", mount_id)
        return self.mounts.get(mount_id, target_pb2.Mount(mount_id=mount_id, state=target_pb2.MOUNT_STATE_GONE))

    async def list_mounts(self, replica_path: str = "") -> list[target_pb2.Mount]:
        self._mount_call("list_mounts", replica_path)
        live = [m for m in self.mounts.values() if m.state != target_pb2.MOUNT_STATE_GONE]
        return [m for m in live if not replica_path or m.replica_path == replica_path]

    async def unmount_point(self, mount_id: str) -> target_pb2.Mount:
        self._mount_call("unmount_point", mount_id)
        mount = self.mounts.get(mount_id, target_pb2.Mount(mount_id=mount_id))
        mount.state = target_pb2.MOUNT_STATE_GONE
        self.mounts[mount_id] = mount
        return mount

    async def flatten_mount(self, mount_id: str) -> target_pb2.Mount:
        self._mount_call("flatten_mount", mount_id)
        mount = self.mounts.get(mount_id)
        if mount is None or mount.state == target_pb2.MOUNT_STATE_GONE:
            raise rpc_error(grpc.StatusCode.NOT_FOUND, f"no mount {mount_id}")
        mount.state = target_pb2.MOUNT_STATE_FLATTENED
        return mount

    async def delete_replica(self, replica_path: str, *, remove_created: bool = False) -> bool:
        self._mount_call("delete_replica", replica_path)
        if remove_created:
            self.removed_created.append(replica_path)
        if any(
            m.replica_path == replica_path and m.state == target_pb2.MOUNT_STATE_MOUNTED for m in self.mounts.values()
        ):
            raise rpc_error(grpc.StatusCode.FAILED_PRECONDITION, f"replica {replica_path} has mounts")
        existed = replica_path in self.points or any(k[0] == replica_path for k in self.disks)
        self.points.pop(replica_path, None)
        self.replicas.pop(replica_path, None)
        for key in [k for k in self.disks if k[0] == replica_path]:
            del self.disks[key]
        self.deleted_replicas.append(replica_path)
        return existed

    async def prepare_failback_disk(self, request: target_pb2.PrepareFailbackDiskRequest) -> target_pb2.ReplicaDisk:
        self._mount_call("prepare_failback_disk", request.replica_path)
        self.failback_disks.append(request)
        disk = target_pb2.ReplicaDisk(replica_path=request.replica_path, disk_id=request.disk_id)
        self.disks[(request.replica_path, request.disk_id)] = disk
        return disk


class FakeAgents:
    """The engine's `Agents`: the fakes by address (a KeyError for an address no test set up)."""

    def __init__(self, *agents: FakeProxy | FakeTarget) -> None:
        self.proxies = {a.address: a for a in agents if isinstance(a, FakeProxy)}
        self.targets = {a.address: a for a in agents if isinstance(a, FakeTarget)}

    def proxy(self, address: str, server_name: str = "") -> ProxyClient:
        return self.proxies[address]

    def target(self, address: str, server_name: str = "") -> TargetClient:
        return self.targets[address]
