"""Which proxy runs a disk task: pure, so the rule is tested without agents."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ProxySlot:
    proxy_id: str
    name: str
    healthy: bool
    max_tasks: int
    running: int
    # Host ids the proxy reads from directly; empty: it serves any host.
    host_ids: frozenset[str]

    @property
    def free(self) -> int:
        return self.max_tasks - self.running if self.healthy else 0


def choose_proxy(proxies: Iterable[ProxySlot], *, host_id: str) -> ProxySlot | None:
    """A healthy proxy with a free slot: one that serves the VM's host first, then any other;
    among equals the one with the most free slots, then by name (stable). None: all are busy or down."""
    ready = [p for p in proxies if p.free > 0]
    if not ready:
        return None
    return min(ready, key=lambda p: (host_id not in p.host_ids, -p.free, p.name))
