"""Background loops, supervised: a step that fails is logged and tried again after a capped backoff, for ever.

A daemon's background work (the controller's scheduler, webhook notifier and metrics refresh) is a step
repeated every few seconds. One database hiccup must neither end that work for good nor, when the daemon
stops, surface as the stop's own failure: `every` keeps the step going, `stop_all` ends the tasks and
reports (never re-raises) anything a task died of, so the shutdown after it still runs.
Cancellation is never swallowed: asyncio.CancelledError always goes through.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, NoReturn

from vmrepl.logs import get_logger

log = get_logger("vmrepl.supervise")

Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Backoff:
    """The wait after the n-th failure in a row: `first`, doubled each time, at most `cap` seconds."""

    first: float = 1.0
    cap: float = 30.0

    def delay(self, failures: int) -> float:
        return float(min(self.cap, self.first * 2 ** max(failures - 1, 0)))


async def every(
    interval: float,
    step: Callable[[], Awaitable[None]],
    *,
    name: str,
    backoff: Backoff = Backoff(),
    sleep: Sleep = asyncio.sleep,
) -> NoReturn:
    """Run `step`, then wait `interval` seconds, for ever. A step that raises is logged (with how many
    failed in a row) and run again after `backoff.delay(failures)`; the first success after failures
    is logged too and resets the backoff. Ends only by cancellation."""
    failures = 0
    while True:
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception:  # any bug or outside failure of one step: the loop outlives it
            failures += 1
            delay = backoff.delay(failures)
            log.exception("background_step_failed", loop=name, failures=failures, retry_in_seconds=delay)
            await sleep(delay)
            continue
        if failures:
            log.info("background_step_recovered", loop=name, after_failures=failures)
            failures = 0
        await sleep(interval)


async def stop_all(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel the tasks and wait until each has ended. A task that had already died of an exception is
    logged, not re-raised: what the caller does next (a daemon's shutdown) must still happen. A
    cancellation of the caller itself still propagates."""
    pending = list(tasks)
    for task in pending:
        task.cancel()
    if not pending:
        return
    await asyncio.wait(pending)
    for task in pending:
        if task.cancelled():
            continue
        error = task.exception()
        if error is not None:
            log.error("background_task_died", loop=task.get_name(), exc_info=error)
