"""Clients of the agents, as the controller (or a tool holding a controller certificate) uses them.

The session engine calls the agents only through the small interfaces here (`ProxyClient`,
`TargetClient`, `Agents`), so its tests put in-process fakes in their place. The gRPC
implementations behind them keep one mTLS channel per agent address. A call that fails raises
`grpc.aio.AioRpcError` as the agent (or the channel) answered: the engine decides by its status code
(see controller.engine.task.transient), and fakes raise the same.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Protocol, cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tenacity import AsyncRetrying, retry_if_result, stop_after_delay, wait_exponential

from vmrepl.config import TlsSettings
from vmrepl.errors import FailedPrecondition, NotFound, ResourceExhausted, Unavailable, VmreplError
from vmrepl.rpc import secure_channel
from vmrepl.v1 import common_pb2, proxy_pb2, proxy_pb2_grpc, target_pb2, target_pb2_grpc

if TYPE_CHECKING:  # the async stubs' types exist only in the generated .pyi files
    from vmrepl.v1.proxy_pb2_grpc import ProxyAgentAsyncStub
    from vmrepl.v1.target_pb2_grpc import TargetAgentAsyncStub

# How long a session start waits for its target to answer (a target restarted a second ago is still starting).
READY_WITHIN_SECONDS = 20.0


class AgentHealth(Protocol):
    @property
    def address(self) -> str: ...

    async def healthy(self, *, within: float = 5.0, wait_for_ready: bool = False) -> bool:
        """Whether the agent answers its gRPC health check as SERVING within `within` seconds
        (`wait_for_ready`: waiting meanwhile for the channel to connect, instead of failing at once)."""
        ...


class ProxyClient(AgentHealth, Protocol):
    """What the engine asks of a source proxy."""

    async def start(self, request: proxy_pb2.StartDiskTransferRequest) -> proxy_pb2.StartDiskTransferResponse: ...

    def watch(
        self, transfer_id: str, *, within: float | None = None
    ) -> AsyncGenerator[proxy_pb2.TransferProgress, None]:
        """The transfer's progress, first its current state, until it ends (close it to stop watching);
        `within`: the seconds the whole call may take (a gRPC deadline, which the agent sees too)."""
        ...

    async def cancel(self, transfer_id: str) -> None: ...

    async def info(self) -> proxy_pb2.AgentInfo: ...


class TargetClient(AgentHealth, Protocol):
    """What the engine asks of a target agent."""

    async def prepare(self, request: target_pb2.PrepareReplicaDiskRequest) -> target_pb2.ReplicaDisk: ...

    async def get_disk(
        self, replica_path: str, disk_id: str, *, within: float | None = None
    ) -> target_pb2.ReplicaDisk: ...

    async def commit(
        self, request: target_pb2.CommitRestorePointRequest, *, within: float | None = None
    ) -> target_pb2.RestorePoint: ...

    async def list_points(self, replica_path: str) -> list[target_pb2.RestorePoint]: ...

    async def delete_point(self, replica_path: str, point_id: str) -> None: ...

    def verify(self, request: target_pb2.VerifyReplicaRequest) -> AsyncGenerator[common_pb2.VerifyProgress, None]:
        """The verification's progress until its last disk is done (close it to stop the verification)."""
        ...

    def read_disk(self, request: target_pb2.ReadReplicaDiskRequest) -> AsyncGenerator[common_pb2.DiskChunk, None]:
        """One disk of a restore point in offset order, then a done chunk (close it to stop reading)."""
        ...

    async def get_replica(self, replica_path: str, *, within: float | None = None) -> target_pb2.Replica: ...

    async def end_session(
        self, request: target_pb2.EndReplicaSessionRequest, *, within: float | None = None
    ) -> target_pb2.Replica:
        """Tells the target how a session that made no restore point ended (idempotent)."""
        ...

    async def rollback(self, replica_path: str, *, within: float | None = None) -> target_pb2.Replica: ...

    # ---- failover and failback (docs/failover.md); each idempotent on the target ----

    async def mount_point(self, request: target_pb2.MountPointRequest) -> target_pb2.Mount: ...

    async def get_mount(self, mount_id: str) -> target_pb2.Mount: ...

    async def list_mounts(self, replica_path: str = "") -> list[target_pb2.Mount]: ...

    async def unmount_point(self, mount_id: str) -> target_pb2.Mount: ...

    async def flatten_mount(self, mount_id: str) -> target_pb2.Mount: ...

    async def delete_replica(self, replica_path: str, *, remove_created: bool = False) -> bool:
        """Whether there was a replica to delete (refused while a mount depends on it). `remove_created`: a
        failback folder's images PrepareFailbackDisk created are removed too."""
        ...

    async def prepare_failback_disk(self, request: target_pb2.PrepareFailbackDiskRequest) -> target_pb2.ReplicaDisk: ...


class Agents(Protocol):
    """The clients of the agents the engine talks to, one per address."""

    def proxy(self, address: str, server_name: str = "") -> ProxyClient: ...

    def target(self, address: str, server_name: str = "") -> TargetClient: ...


# What an agent's refusal becomes when the controller relays it to its own caller: the caller's request was
# checked by the controller, so an agent's INVALID_ARGUMENT or PERMISSION_DENIED is no fault of the caller's.
_RELAYED: dict[grpc.StatusCode, type[VmreplError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.INVALID_ARGUMENT: FailedPrecondition,
    grpc.StatusCode.PERMISSION_DENIED: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: Unavailable,
}


def relayed(error: grpc.aio.AioRpcError, agent: str) -> VmreplError:
    """An agent's error as the controller's caller gets it: the agent named, its code kept where it fits."""
    code = error.code()
    kind = _RELAYED.get(code, VmreplError)  # anything else: INTERNAL, with the agent's words
    return kind(f"{agent} answered {code.name}: {error.details()}")


async def ready(client: AgentHealth, *, within: float = READY_WITHIN_SECONDS) -> bool:
    """Whether the agent answers SERVING within `within` seconds, asking again after short waits.
    An agent restarted a moment ago is still starting, and the channel to its address may be waiting
    to reconnect: one failed check is no reason to give up on it."""
    retrying = AsyncRetrying(
        stop=stop_after_delay(within),
        wait=wait_exponential(multiplier=0.2, max=2.0),
        retry=retry_if_result(lambda ok: not ok),
        retry_error_callback=lambda _state: False,
    )

    async def check() -> bool:
        return await client.healthy(within=min(5.0, within), wait_for_ready=True)

    ok: bool = await retrying(check)
    return ok


class _GrpcAgent:
    """One mTLS channel to an agent and its health check."""

    def __init__(self, address: str, channel: grpc.aio.Channel) -> None:
        self._address = address
        # Public for the tests that speak to an agent at the wire level (bad input, races).
        self.channel = channel

    @property
    def address(self) -> str:
        return self._address

    async def healthy(self, *, within: float = 5.0, wait_for_ready: bool = False) -> bool:
        stub = health_pb2_grpc.HealthStub(self.channel)
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=within, wait_for_ready=wait_for_ready)
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    async def close(self) -> None:
        await self.channel.close()


class GrpcProxyClient(_GrpcAgent):
    def __init__(self, address: str, channel: grpc.aio.Channel) -> None:
        super().__init__(address, channel)
        # grpc ships no types, so mypy cannot pick the stub's aio overload by the channel's type.
        self.stub = cast("ProxyAgentAsyncStub", proxy_pb2_grpc.ProxyAgentStub(channel))
        self._info: proxy_pb2.AgentInfo | None = None

    async def start(self, request: proxy_pb2.StartDiskTransferRequest) -> proxy_pb2.StartDiskTransferResponse:
        reply: proxy_pb2.StartDiskTransferResponse = await self.stub.StartDiskTransfer(request)
        return reply

    async def watch(
        self, transfer_id: str, *, within: float | None = None
    ) -> AsyncGenerator[proxy_pb2.TransferProgress, None]:
        call = self.stub.WatchTransfer(proxy_pb2.WatchTransferRequest(transfer_id=transfer_id), timeout=within)
        try:
            async for progress in call:
                yield progress
        finally:
            call.cancel()

    async def cancel(self, transfer_id: str) -> None:
        await self.stub.CancelTransfer(proxy_pb2.CancelTransferRequest(transfer_id=transfer_id))

    async def info(self) -> proxy_pb2.AgentInfo:
        """Asked once per client while the answer names a proxy (its tickets are bound to that name)."""
        if self._info is None:
            info: proxy_pb2.AgentInfo = await self.stub.GetAgentInfo(proxy_pb2.GetAgentInfoRequest(), timeout=10)
            if info.role != "proxy" or not info.certificate_name:
                return info
            self._info = info
        return self._info


class GrpcTargetClient(_GrpcAgent):
    def __init__(self, address: str, channel: grpc.aio.Channel) -> None:
        super().__init__(address, channel)
        self.stub = cast("TargetAgentAsyncStub", target_pb2_grpc.TargetAgentStub(channel))

    async def prepare(self, request: target_pb2.PrepareReplicaDiskRequest) -> target_pb2.ReplicaDisk:
        disk: target_pb2.ReplicaDisk = await self.stub.PrepareReplicaDisk(request)
        return disk

    async def get_disk(self, replica_path: str, disk_id: str, *, within: float | None = None) -> target_pb2.ReplicaDisk:
        request = target_pb2.GetReplicaDiskRequest(replica_path=replica_path, disk_id=disk_id)
        disk: target_pb2.ReplicaDisk = await self.stub.GetReplicaDisk(request, timeout=within)
        return disk

    async def commit(
        self, request: target_pb2.CommitRestorePointRequest, *, within: float | None = None
    ) -> target_pb2.RestorePoint:
        point: target_pb2.RestorePoint = await self.stub.CommitRestorePoint(request, timeout=within)
        return point

    async def list_points(self, replica_path: str) -> list[target_pb2.RestorePoint]:
        listed = await self.stub.ListRestorePoints(target_pb2.ListRestorePointsRequest(replica_path=replica_path))
        return list(listed.restore_points)

    async def delete_point(self, replica_path: str, point_id: str) -> None:
        await self.stub.DeleteRestorePoint(
            target_pb2.DeleteRestorePointRequest(replica_path=replica_path, restore_point_id=point_id)
        )

    async def verify(self, request: target_pb2.VerifyReplicaRequest) -> AsyncGenerator[common_pb2.VerifyProgress, None]:
        call = self.stub.VerifyReplica(request)  # no deadline: a whole disk's check takes as long as its reads
        try:
            async for progress in call:
                yield progress
        finally:
            call.cancel()

    async def read_disk(self, request: target_pb2.ReadReplicaDiskRequest) -> AsyncGenerator[common_pb2.DiskChunk, None]:
        call = self.stub.ReadReplicaDisk(request)
        try:
            async for chunk in call:
                yield chunk
        finally:
            call.cancel()

    async def get_replica(self, replica_path: str, *, within: float | None = None) -> target_pb2.Replica:
        request = target_pb2.GetReplicaRequest(replica_path=replica_path)
        replica: target_pb2.Replica = await self.stub.GetReplica(request, timeout=within)
        return replica

    async def end_session(
        self, request: target_pb2.EndReplicaSessionRequest, *, within: float | None = None
    ) -> target_pb2.Replica:
        replica: target_pb2.Replica = await self.stub.EndReplicaSession(request, timeout=within)
        return replica

    async def rollback(self, replica_path: str, *, within: float | None = None) -> target_pb2.Replica:
        request = target_pb2.RollbackReplicaRequest(replica_path=replica_path)
        replica: target_pb2.Replica = await self.stub.RollbackReplica(request, timeout=within)
        return replica

    async def mount_point(self, request: target_pb2.MountPointRequest) -> target_pb2.Mount:
        # No deadline: an older point copies the blocks its rollback data holds, as long as that takes.
        mount: target_pb2.Mount = await self.stub.MountPoint(request)
        return mount

    async def get_mount(self, mount_id: str) -> target_pb2.Mount:
        mount: target_pb2.Mount = await self.stub.GetMount(target_pb2.GetMountRequest(mount_id=mount_id), timeout=30)
        return mount

    async def list_mounts(self, replica_path: str = "") -> list[target_pb2.Mount]:
        listed = await self.stub.ListMounts(target_pb2.ListMountsRequest(replica_path=replica_path), timeout=30)
        return list(listed.mounts)

    async def unmount_point(self, mount_id: str) -> target_pb2.Mount:
        request = target_pb2.UnmountPointRequest(mount_id=mount_id)
        mount: target_pb2.Mount = await self.stub.UnmountPoint(request)
        return mount

    async def flatten_mount(self, mount_id: str) -> target_pb2.Mount:
        request = target_pb2.FlattenMountRequest(mount_id=mount_id)
        mount: target_pb2.Mount = await self.stub.FlattenMount(request)  # merges whole disks: no deadline
        return mount

    async def delete_replica(self, replica_path: str, *, remove_created: bool = False) -> bool:
        ask = target_pb2.DeleteReplicaRequest(replica_path=replica_path, remove_created=remove_created)
        reply = await self.stub.DeleteReplica(ask)
        return bool(reply.deleted)

    async def prepare_failback_disk(self, request: target_pb2.PrepareFailbackDiskRequest) -> target_pb2.ReplicaDisk:
        disk: target_pb2.ReplicaDisk = await self.stub.PrepareFailbackDisk(request)  # digests every block
        return disk


def proxy_client(address: str, tls: TlsSettings, *, server_name: str = "") -> GrpcProxyClient:
    return GrpcProxyClient(address, secure_channel(address, tls, server_name=server_name))


def target_client(address: str, tls: TlsSettings, *, server_name: str = "") -> GrpcTargetClient:
    return GrpcTargetClient(address, secure_channel(address, tls, server_name=server_name))


class AgentPool:
    """One channel per agent address, kept for the controller's lifetime."""

    def __init__(self, tls: TlsSettings) -> None:
        self._tls = tls
        self._proxies: dict[tuple[str, str], GrpcProxyClient] = {}
        self._targets: dict[tuple[str, str], GrpcTargetClient] = {}

    def proxy(self, address: str, server_name: str = "") -> GrpcProxyClient:
        key = (address, server_name)
        if key not in self._proxies:
            self._proxies[key] = proxy_client(address, self._tls, server_name=server_name)
        return self._proxies[key]

    def target(self, address: str, server_name: str = "") -> GrpcTargetClient:
        key = (address, server_name)
        if key not in self._targets:
            self._targets[key] = target_client(address, self._tls, server_name=server_name)
        return self._targets[key]

    async def close(self) -> None:
        for c in [*self._proxies.values(), *self._targets.values()]:
            await c.close()
        self._proxies.clear()
        self._targets.clear()
