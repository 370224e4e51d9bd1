"""Clients of the agents, as the controller (or a tool holding a controller certificate) uses them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from protos.vmrepl.v1 import proxy_pb2_grpc, target_pb2_grpc
from vmrepl.config import TlsSettings
from vmrepl.rpc import secure_channel


@dataclass
class AgentClient:
    address: str
    channel: Any
    stub: Any

    async def close(self) -> None:
        await self.channel.close()


def proxy_client(address: str, tls: TlsSettings, *, server_name: str = "") -> AgentClient:
    ch = secure_channel(address, tls, server_name=server_name)
    return AgentClient(address, ch, proxy_pb2_grpc.ProxyAgentStub(ch))


def target_client(address: str, tls: TlsSettings, *, server_name: str = "") -> AgentClient:
    ch = secure_channel(address, tls, server_name=server_name)
    return AgentClient(address, ch, target_pb2_grpc.TargetAgentStub(ch))
