"""Proxies and targets: their messages, checks and changes."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy.ext.asyncio import AsyncSession

from controller.api.resources.common import by_name, check_address
from controller.db.models import Host, Proxy, Target
from vmrepl.domain import DEFAULT_SLOTS, SLOTS_LIMIT
from vmrepl.errors import InvalidArgument
from vmrepl.v1 import controller_pb2 as api

PROXY_FIELDS = ("address", "tls_server_name", "max_tasks", "hosts")
TARGET_FIELDS = ("address", "tls_server_name", "max_tasks")


async def proxy_msg(db: AsyncSession, row: Proxy) -> api.Proxy:
    hosts = []
    for hid in row.host_ids:
        h = await db.get(Host, str(hid))
        if h is not None:
            hosts.append(f"hosts/{h.name}")
    return api.Proxy(
        name=f"proxies/{row.name}",
        address=row.address,
        tls_server_name=row.tls_server_name,
        max_tasks=row.max_tasks,
        hosts=hosts,
    )


def target_msg(row: Target) -> api.Target:
    return api.Target(
        name=f"targets/{row.name}", address=row.address, tls_server_name=row.tls_server_name, max_tasks=row.max_tasks
    )


async def apply_agent(
    db: AsyncSession, kind: str, msg: api.Proxy | api.Target, row: Proxy | Target, paths: Iterable[str]
) -> None:
    for path in paths:
        if path == "address":
            row.address = check_address(f"{kind}.address", msg.address)
        elif path == "tls_server_name":
            if len(msg.tls_server_name) > 256:
                raise InvalidArgument(f"{kind}.tls_server_name", "is longer than 256 characters")
            row.tls_server_name = msg.tls_server_name
        elif path == "max_tasks":
            row.max_tasks = SLOTS_LIMIT.check(f"{kind}.max_tasks", msg.max_tasks or DEFAULT_SLOTS)
        elif path == "hosts" and isinstance(msg, api.Proxy) and isinstance(row, Proxy):
            ids = []
            for i, h in enumerate(msg.hosts):
                ids.append((await by_name(db, Host, f"proxy.hosts[{i}]", h, "hosts")).id)
            row.host_ids = ids
