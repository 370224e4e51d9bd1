"""Bandwidth limit: a token bucket on bytes put on the wire."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class TokenBucket:
    """`rate` bytes a second, bursts up to `burst` bytes. `delay` is pure; `consume` sleeps it off."""

    def __init__(self, *, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be positive")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._stamp = clock()

    def delay(self, n: int) -> float:
        """Take `n` bytes; returns how long to wait before sending them (tokens may go negative)."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        self._tokens -= n
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    async def consume(self, n: int) -> None:
        wait = self.delay(n)
        if wait > 0:
            await asyncio.sleep(wait)
