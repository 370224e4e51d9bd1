"""Supervised background loops (vmrepl.supervise) and the controller daemon's stop path. In-process, no sleeps
longer than a few hundredths of a second: the backoff's sleep is injected."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import async_sessionmaker
from structlog.testing import capture_logs

from controller.db.connect import make_engine, sqlite_url
from controller.engine.journal import Journal
from controller.observability import metrics
from controller.serve import shut_down
from vmrepl.supervise import Backoff, every, stop_all


class Ended(BaseException):
    """Raised by the fake sleep to end a loop after the steps a test wants (not an Exception: never retried)."""


def fake_sleep(waits: list[float], *, calls: int) -> Callable[[float], Awaitable[None]]:
    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) >= calls:
            raise Ended

    return sleep


def scripted(outcomes: list[BaseException | None]) -> tuple[Callable[[], Awaitable[None]], list[int]]:
    """A step that raises (or returns, for None) each of `outcomes` in turn."""
    ran: list[int] = []

    async def step() -> None:
        ran.append(1)
        outcome = outcomes[len(ran) - 1]
        if outcome is not None:
            raise outcome

    return step, ran


def test_backoff_doubles_up_to_its_cap() -> None:
    assert [Backoff(first=1, cap=5).delay(n) for n in range(1, 6)] == [1, 2, 4, 5, 5]


async def test_a_failing_step_is_logged_and_run_again_after_backoff() -> None:
    step, ran = scripted([RuntimeError("db away"), OSError("still away"), None, ValueError("again")])
    waits: list[float] = []
    with capture_logs() as logs, pytest.raises(Ended):
        await every(7.0, step, name="gauges", backoff=Backoff(first=1, cap=30), sleep=fake_sleep(waits, calls=4))
    # Two failures back off 1 s then 2 s; a success waits the interval and resets the backoff.
    assert waits == [1, 2, 7, 1]
    assert len(ran) == 4
    failed = [e for e in logs if e["event"] == "background_step_failed"]
    assert [(e["loop"], e["failures"], e["retry_in_seconds"]) for e in failed] == [
        ("gauges", 1, 1),
        ("gauges", 2, 2),
        ("gauges", 1, 1),
    ]
    assert all(e["log_level"] == "error" and e.get("exc_info") for e in failed)
    assert [e["after_failures"] for e in logs if e["event"] == "background_step_recovered"] == [2]


async def test_cancellation_inside_a_step_is_not_retried() -> None:
    step, ran = scripted([asyncio.CancelledError(), None])
    waits: list[float] = []
    with pytest.raises(asyncio.CancelledError):
        await every(1.0, step, name="scheduler", sleep=fake_sleep(waits, calls=5))
    assert ran == [1] and waits == []


async def test_cancel_stops_the_loop_between_and_during_steps() -> None:
    started = asyncio.Event()

    async def step() -> None:
        started.set()
        await asyncio.Event().wait()  # a step that never ends by itself

    task = asyncio.create_task(every(0.01, step, name="webhooks"))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


async def test_stop_all_logs_a_task_that_died_and_ends_the_others() -> None:
    async def die() -> None:
        raise RuntimeError("loop died")

    dead = asyncio.create_task(die(), name="metrics")
    alive = asyncio.create_task(asyncio.Event().wait(), name="scheduler")
    await asyncio.sleep(0)
    with capture_logs() as logs:
        await stop_all([dead, alive])  # does not raise the dead task's error
    assert alive.cancelled() and dead.done()
    assert [(e["event"], e["loop"]) for e in logs] == [("background_task_died", "metrics")]


async def test_metrics_refresh_outlives_a_database_error(tmp_path: Path) -> None:
    # A database without the controller's tables: every refresh fails (before supervision, the first one
    # ended the metrics task for good).
    db = make_engine(sqlite_url(tmp_path / "empty.db"))
    try:
        with capture_logs() as logs:
            gauges = asyncio.create_task(metrics.keep_fresh(Journal(async_sessionmaker(db))), name="metrics")
            for _ in range(200):
                if any(e["event"] == "background_step_failed" for e in logs):
                    break
                await asyncio.sleep(0.01)
            assert not gauges.done(), "the metrics loop died of a database error"
            await stop_all([gauges])
        assert [e["loop"] for e in logs if e["event"] == "background_step_failed"] == ["metrics"]
        assert gauges.cancelled()
    finally:
        await db.dispose()


class FakeEngine:
    def __init__(self, order: list[str]) -> None:
        self.order = order

    async def shutdown(self, grace: float) -> None:
        self.order.append(f"engine {grace}")


async def test_daemon_stop_shuts_the_engine_down_after_a_background_loop_died() -> None:
    order: list[str] = []

    async def died() -> None:
        raise RuntimeError("database is locked")

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            order.append("scheduler stopped")

    background = [asyncio.create_task(died(), name="metrics"), asyncio.create_task(forever(), name="scheduler")]
    await asyncio.sleep(0)

    def closer(what: str) -> Callable[[], Awaitable[None]]:
        async def close() -> None:
            order.append(what)

        return close

    with capture_logs() as logs:
        await shut_down(background, FakeEngine(order), grace=3.0, then=[closer("agents"), closer("database")])
    # The loops end before the engine stops (no new session starts meanwhile), then everything closes.
    assert order == ["scheduler stopped", "engine 3.0", "agents", "database"]
    assert [e["loop"] for e in logs if e["event"] == "background_task_died"] == ["metrics"]
