"""Clients of the agents, as the controller (or a tool holding a controller certificate) uses them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tenacity import AsyncRetrying, retry_if_result, stop_after_delay, wait_exponential

from vmrepl.config import TlsSettings
from vmrepl.rpc import secure_channel
from vmrepl.v1 import proxy_pb2_grpc, target_pb2_grpc

# How long a session start waits for its target to answer (a target restarted a second ago is still starting).
READY_WITHIN_SECONDS = 20.0


@dataclass
class AgentClient:
    address: str
    channel: Any
    stub: Any
    # The agent's certificate name, once asked (controller.engine.transfer.proxy_identity).
    identity: str = ""

    async def close(self) -> None:
        await self.channel.close()


def proxy_client(address: str, tls: TlsSettings, *, server_name: str = "") -> AgentClient:
    ch = secure_channel(address, tls, server_name=server_name)
    return AgentClient(address, ch, proxy_pb2_grpc.ProxyAgentStub(ch))


def target_client(address: str, tls: TlsSettings, *, server_name: str = "") -> AgentClient:
    ch = secure_channel(address, tls, server_name=server_name)
    return AgentClient(address, ch, target_pb2_grpc.TargetAgentStub(ch))


class AgentPool:
    """One channel per agent address, kept for the controller's lifetime, and health checks."""

    def __init__(self, tls: TlsSettings) -> None:
        self._tls = tls
        self._clients: dict[tuple[str, str, str], AgentClient] = {}

    def proxy(self, address: str, server_name: str = "") -> AgentClient:
        key = ("proxy", address, server_name)
        if key not in self._clients:
            self._clients[key] = proxy_client(address, self._tls, server_name=server_name)
        return self._clients[key]

    def target(self, address: str, server_name: str = "") -> AgentClient:
        key = ("target", address, server_name)
        if key not in self._clients:
            self._clients[key] = target_client(address, self._tls, server_name=server_name)
        return self._clients[key]

    async def healthy(self, client: AgentClient, *, within: float = 5.0, wait_for_ready: bool = False) -> bool:
        """Whether the agent answers its gRPC health check as SERVING within `within` seconds
        (`wait_for_ready`: waiting meanwhile for the channel to connect, instead of failing at once)."""
        stub = health_pb2_grpc.HealthStub(client.channel)
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=within, wait_for_ready=wait_for_ready)
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    async def ready(self, client: AgentClient, *, within: float = READY_WITHIN_SECONDS) -> bool:
        """Whether the agent answers SERVING within `within` seconds, asking again after short waits.
        An agent restarted a moment ago is still starting, and the channel to its address may be waiting
        to reconnect: one failed check is no reason to give up on it."""
        retrying = AsyncRetrying(
            stop=stop_after_delay(within),
            wait=wait_exponential(multiplier=0.2, max=2.0),
            retry=retry_if_result(lambda ok: not ok),
            retry_error_callback=lambda _state: False,
        )
        ok: bool = await retrying(self.healthy, client, within=min(5.0, within), wait_for_ready=True)
        return ok

    async def close(self) -> None:
        for c in self._clients.values():
            await c.close()
        self._clients.clear()
