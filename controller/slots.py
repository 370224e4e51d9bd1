"""Task slots of proxies and targets: a task waits until a proxy and its target both have one free.

Counts live in memory: this controller process starts every transfer, and after
a restart the reattached tasks claim their slots again before anything new starts.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence

from controller.placement import ProxySlot, choose_proxy
from vmrepl.errors import FailedPrecondition


class NoProxy(FailedPrecondition):
    """No proxy answers its health check."""


# A slot frees on release (which wakes waiters); the periodic re-check only catches proxies coming back up.
RECHECK_SECONDS = 5.0


class SlotBoard:
    def __init__(self) -> None:
        self._proxies: Counter[str] = Counter()
        self._targets: Counter[str] = Counter()
        self._changed = asyncio.Condition()
        self._releases = 0

    def running(self, proxy_id: str) -> int:
        return self._proxies[proxy_id]

    async def acquire(
        self,
        proxies: Callable[[], Awaitable[Sequence[ProxySlot]]],
        *,
        host_id: str,
        target_id: str,
        target_max: int,
    ) -> ProxySlot:
        """A proxy for a task on `host_id`, its slot and one of the target's taken. `proxies` lists them
        with health and capacity (called again after each wait). Raises FailedPrecondition when none is up."""
        while True:
            seen = self._releases
            # Listed outside the lock: health checks take time and must not hold up releases.
            listed = await proxies()
            async with self._changed:
                slots = [
                    ProxySlot(p.proxy_id, p.name, p.healthy, p.max_tasks, self._proxies[p.proxy_id], p.host_ids)
                    for p in listed
                ]
                if not any(s.healthy for s in slots):
                    raise NoProxy("no proxy answers its health check")
                chosen = choose_proxy(slots, host_id=host_id)
                if chosen is not None and self._targets[target_id] < target_max:
                    self.claim(chosen.proxy_id, target_id)
                    return chosen
                if seen == self._releases:  # nothing freed meanwhile: wait for a release (or re-check)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), RECHECK_SECONDS)

    def claim(self, proxy_id: str, target_id: str) -> None:
        self._proxies[proxy_id] += 1
        self._targets[target_id] += 1

    async def release(self, proxy_id: str, target_id: str) -> None:
        async with self._changed:
            self._proxies[proxy_id] -= 1
            self._targets[target_id] -= 1
            self._releases += 1
            self._changed.notify_all()
