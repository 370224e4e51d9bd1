"""Task slots of proxies and targets: a task waits until a proxy and its target both have one free.

Counts live in memory: this controller process starts every transfer, and after
a restart the reattached tasks claim their slots again before anything new starts.

Waiting tasks are served fairly across sessions (so across jobs): a free slot goes to the waiter whose
session has started the fewest tasks so far, then to the one waiting longest, among the waiters that
could use that same proxy and target. One large job does not starve a small one.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import count

from controller.engine.placement import ProxySlot, choose_proxy
from vmrepl.errors import FailedPrecondition


class NoProxy(FailedPrecondition):
    """No proxy answers its health check."""


# A slot frees on release (which wakes waiters); the periodic re-check only catches proxies coming back up.
RECHECK_SECONDS = 5.0
YIELD_SECONDS = 0.2
NO_PROXY_RECHECK_SECONDS = 1.0  # how soon the proxies are asked again while none answers


@dataclass
class Waiter:
    session_id: str
    target_id: str
    since: int
    usable: frozenset[str] = frozenset()  # proxies it could run on now (healthy), as last listed


def yields_to(me: Waiter, others: Iterable[Waiter], served: Counter[str], proxy_id: str) -> bool:
    """Whether `me` must leave the slot on `proxy_id` to another waiter that goes first. Pure."""
    rank = (served[me.session_id], me.since)
    return any(
        o is not me and o.target_id == me.target_id and proxy_id in o.usable and (served[o.session_id], o.since) < rank
        for o in others
    )


class SlotBoard:
    def __init__(self, *, no_proxy_grace: float = 20.0) -> None:
        # How long no proxy may answer before a task gives up: one restarting a moment ago is still
        # starting, and failing every waiting disk on one missed health check would fail whole sessions.
        self._no_proxy_grace = no_proxy_grace
        self._proxies: Counter[str] = Counter()
        self._targets: Counter[str] = Counter()
        self._changed = asyncio.Condition()
        self._releases = 0
        self._waiters: list[Waiter] = []
        self._served: Counter[str] = Counter()  # tasks started per session
        self._order = count()

    async def acquire(
        self,
        proxies: Callable[[], Awaitable[Sequence[ProxySlot]]],
        *,
        host_id: str,
        target_id: str,
        target_max: int,
        session_id: str = "",
    ) -> ProxySlot:
        """A proxy for a task on `host_id`, its slot and one of the target's taken. `proxies` lists them
        with health and capacity (called again after each wait). Raises FailedPrecondition when none is up."""
        me = Waiter(session_id, target_id, next(self._order))
        self._waiters.append(me)
        try:
            return await self._acquire(me, proxies, host_id=host_id, target_max=target_max)
        finally:
            self._waiters.remove(me)

    async def _acquire(
        self,
        me: Waiter,
        proxies: Callable[[], Awaitable[Sequence[ProxySlot]]],
        *,
        host_id: str,
        target_max: int,
    ) -> ProxySlot:
        target_id = me.target_id
        none_since: float | None = None
        while True:
            seen = self._releases
            # Listed outside the lock: health checks take time and must not hold up releases.
            listed = await proxies()
            if not any(p.healthy for p in listed):
                none_since = self._no_proxy(none_since)
                await asyncio.sleep(min(NO_PROXY_RECHECK_SECONDS, self._no_proxy_grace))
                continue
            none_since = None
            async with self._changed:
                slots = [
                    ProxySlot(p.proxy_id, p.name, p.healthy, p.max_tasks, self._proxies[p.proxy_id], p.host_ids)
                    for p in listed
                ]
                me.usable = frozenset(s.proxy_id for s in slots if s.healthy)
                chosen = choose_proxy(slots, host_id=host_id)
                free = chosen is not None and self._targets[target_id] < target_max
                if chosen is not None and free and not yields_to(me, self._waiters, self._served, chosen.proxy_id):
                    self.claim(chosen.proxy_id, target_id)
                    self._served[me.session_id] += 1
                    return chosen
                wait = RECHECK_SECONDS
                if free:  # left to a waiter that goes first: make sure it looks, and look again soon
                    self._changed.notify_all()
                    wait = YIELD_SECONDS
                if seen == self._releases or free:  # nothing freed meanwhile: wait for a release (or re-check)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), wait)

    def _no_proxy(self, since: float | None) -> float:
        """When the proxies started not answering; NoProxy once that is longer ago than the grace."""
        now = time.monotonic()
        since = now if since is None else since
        if now - since >= self._no_proxy_grace:
            raise NoProxy(f"no proxy answered its health check for {self._no_proxy_grace:g} s")
        return since

    def claim(self, proxy_id: str, target_id: str) -> None:
        self._proxies[proxy_id] += 1
        self._targets[target_id] += 1

    async def release(self, proxy_id: str, target_id: str) -> None:
        async with self._changed:
            self._proxies[proxy_id] -= 1
            self._targets[target_id] -= 1
            self._releases += 1
            self._changed.notify_all()
