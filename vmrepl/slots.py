"""Bounded concurrency per caller and in total: how many calls of one kind may be in progress at once.

Taken before a call reads anything, so a caller over its bound costs the
server nothing but the refusal (`RESOURCE_EXHAUSTED`, which clients retry).
"""

from __future__ import annotations

from collections import Counter

from vmrepl.errors import ResourceExhausted


class Slots:
    """At most `per_peer` holders per peer and `total` in all. Not thread-safe: use from the event loop."""

    def __init__(self, *, per_peer: int, total: int, what: str) -> None:
        if per_peer < 1 or total < 1:
            raise ValueError("slot limits must be at least 1")
        self.per_peer = per_peer
        self.total = total
        self.what = what
        self._held: Counter[str] = Counter()
        self.in_use = 0

    def take(self, peer: str) -> None:
        """Hold a slot for `peer`, or raise ResourceExhausted naming the bound it would pass."""
        if self._held[peer] >= self.per_peer:
            raise ResourceExhausted(f"{peer!r} already has {self.per_peer} {self.what} open (the limit per peer)")
        if self.in_use >= self.total:
            raise ResourceExhausted(f"{self.total} {self.what} are open (the limit); try again later")
        self._held[peer] += 1
        self.in_use += 1

    def give(self, peer: str) -> bool:
        """Give back a slot `peer` holds; True when that was the last slot held by anyone."""
        if self._held[peer] <= 0:
            raise ValueError(f"{peer!r} holds no slot")
        self._held[peer] -= 1
        if not self._held[peer]:
            del self._held[peer]
        self.in_use -= 1
        return self.in_use == 0

    def held_by(self, peer: str) -> int:
        return self._held[peer]
