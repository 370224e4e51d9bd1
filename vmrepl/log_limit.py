"""Rate-limited log lines for refused calls, so a caller cannot flood a program's log and disk.

Every refused or failed gRPC call (wrong role, past the call limits, a bad request, ...) is worth a line,
but anyone holding a valid certificate can make thousands a second. `LogLimiter` logs the first `burst`
lines per key (peer, method, reason kind) in each window as usual, counts the rest, and when the window
ends logs one summary line: the same event and fields as the last suppressed line plus `suppressed=N`.
`refused` also counts every refusal in a Prometheus counter by method and gRPC code, so the operator
loses no number to the limit.

The memory is bounded: at most `max_keys` windows are tracked; past that the oldest is summarised and
dropped, so a flood of distinct peers cannot grow it without limit.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter

from vmrepl.errors import PeerNotAllowed
from vmrepl.security.tls import peer_identity

REFUSED_CALLS = Counter(
    "vmrepl_rpc_refused_total",
    "gRPC calls refused or failed (each one, logged or not), by method and status code",
    ["method", "code"],
)


@dataclass
class _Window:
    start: float
    logged: int = 0
    suppressed: int = 0
    # The logger, event and fields of the last suppressed line: the summary repeats them.
    last: tuple[Any, str, dict[str, Any]] | None = field(default=None)


class LogLimiter:
    """At most `burst` lines per key per `window_seconds`, then one summary. Use from one thread (the loop)."""

    def __init__(
        self,
        *,
        burst: int = 5,
        window_seconds: float = 60.0,
        max_keys: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if burst < 1 or window_seconds <= 0 or max_keys < 1:
            raise ValueError("burst and max_keys must be at least 1, window_seconds positive")
        self.burst = burst
        self.window_seconds = window_seconds
        self.max_keys = max_keys
        self.clock = clock
        # Insertion order is window-start order: a key whose window ended is removed and starts a new one
        # at the end, so the ended windows are always at the front.
        self._windows: dict[Hashable, _Window] = {}
        self._timer: tuple[asyncio.AbstractEventLoop, asyncio.TimerHandle] | None = None

    def __len__(self) -> int:
        return len(self._windows)

    def warning(self, key: Hashable, logger: Any, event: str, *, exc_info: bool = False, **fields: Any) -> bool:
        """Log `event` at warning (with the current exception if `exc_info`) unless `key` used its burst.

        Returns whether the line was written.
        """
        now = self.clock()
        self.flush(now)
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = _Window(start=now)
            while len(self._windows) > self.max_keys:
                self._summarise(self._windows.pop(next(iter(self._windows))))
        if window.logged < self.burst:
            window.logged += 1
            (logger.exception if exc_info else logger.warning)(event, **fields)
            return True
        window.suppressed += 1
        window.last = (logger, event, fields)
        self._schedule_flush()
        return False

    def flush(self, now: float | None = None) -> None:
        """Summarise and forget every window that has ended by `now` (the clock's time by default)."""
        now = self.clock() if now is None else now
        while self._windows:
            key = next(iter(self._windows))
            if self._windows[key].start + self.window_seconds > now:
                break
            self._summarise(self._windows.pop(key))

    @staticmethod
    def _summarise(window: _Window) -> None:
        if window.suppressed and window.last is not None:
            logger, event, fields = window.last
            logger.warning(event, **fields, suppressed=window.suppressed)

    def _schedule_flush(self) -> None:
        """Make sure a summary is written when the window ends even if no other line comes to trigger it."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a unit test): summaries come with the next line or flush()
            return
        if self._timer is not None and self._timer[0] is loop and not self._timer[1].cancelled():
            return
        # The earliest window still holding suppressed lines ends first (windows are in start order).
        start = next(w.start for w in self._windows.values() if w.suppressed)
        delay = min(max(start + self.window_seconds - self.clock(), 0.0), self.window_seconds)
        self._timer = (loop, loop.call_later(delay, self._on_timer))

    def _on_timer(self) -> None:
        self._timer = None
        self.flush()
        if any(w.suppressed for w in self._windows.values()):
            self._schedule_flush()


# The one limiter of the process (one program per process): rpc.py and call_limits.py share it.
REFUSALS = LogLimiter()


def peer_of(context: Any) -> str:
    """Who is calling, for the log key: the certificate's name, else the address without its port
    (a new connection gets a new port, and must not get a new budget of lines)."""
    try:
        return peer_identity(context)[0]
    except PeerNotAllowed:
        return str(context.peer()).rpartition(":")[0] or str(context.peer())


def refused(
    logger: Any, event: str, *, peer: str, method: str, code: str, exc_info: bool = False, **fields: Any
) -> None:
    """Count a refused call and log it through the process's limiter (key: peer, method, code)."""
    REFUSED_CALLS.labels(method, code).inc()
    REFUSALS.warning(
        (peer, method, code), logger, event, exc_info=exc_info, peer=peer, method=method, code=code, **fields
    )
