"""Fake time for code that takes a clock: only `advance` moves it."""

from __future__ import annotations

import datetime as dt

START = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


class Clock:
    """`clock()` is the current moment (timezone-aware UTC), for code that takes a wall clock;
    `clock.seconds()` the seconds since the clock started, for code that takes a monotonic one."""

    def __init__(self, start: dt.datetime = START) -> None:
        self.start = start
        self._seconds = 0.0  # kept as a float, so fractions of a second add up exactly as the code's own

    @property
    def now(self) -> dt.datetime:
        return self.start + dt.timedelta(seconds=self._seconds)

    def __call__(self) -> dt.datetime:
        return self.now

    def seconds(self) -> float:
        return self._seconds

    def advance(self, seconds: float = 0.0, **delta: float) -> None:
        """Moves the clock on by `seconds` and any timedelta fields (minutes=, hours=, days=)."""
        self._seconds += seconds + dt.timedelta(**delta).total_seconds()
