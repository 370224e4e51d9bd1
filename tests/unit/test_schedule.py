"""Schedules against a controllable clock: cron in a time zone across both DST changes, intervals,
missed runs, permitted hours, continuous and after-job."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping

import pytest

from controller.scheduling.schedule import (
    KIND_NAMES,
    KINDS,
    decide_after,
    decide_continuous,
    decide_timed,
    next_slot,
    parse_schedule,
    schedule_json,
    schedule_message,
)
from vmrepl.errors import InvalidArgument
from vmrepl.v1 import controller_pb2 as api

UTC = dt.UTC


def at(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> dt.datetime:
    return dt.datetime(year, month, day, hour, minute, tzinfo=UTC)


def runs(raw: Mapping[str, object], start: dt.datetime, end: dt.datetime) -> list[dt.datetime]:
    """Every run a controller ticking each minute from `start` to `end` would start."""
    s = parse_schedule(dict(raw))
    handled, out, now = start, [], start
    while now <= end:
        d = decide_timed(s, now=now, handled_until=handled, running=False)
        handled = d.handled_until or handled
        if d.start:
            out.append(now)
        now += dt.timedelta(minutes=1)
    return out


BERLIN_DAILY: dict[str, object] = {"kind": "cron", "cron": "30 2 * * *", "timezone": "Europe/Berlin"}


def test_spring_forward_neither_skips_nor_doubles() -> None:
    # 2026-03-29: Berlin jumps from 02:00 to 03:00; 02:30 does not exist and runs when the clock passes it.
    got = runs(BERLIN_DAILY, at(2026, 3, 27, 12), at(2026, 3, 31, 12))
    assert got == [at(2026, 3, 28, 1, 30), at(2026, 3, 29, 1, 30), at(2026, 3, 30, 0, 30), at(2026, 3, 31, 0, 30)]
    assert got[1].astimezone(parse_schedule(BERLIN_DAILY).zone).strftime("%H:%M %Z") == "03:30 CEST"


def test_fall_back_runs_once() -> None:
    # 2026-10-25: Berlin goes from 03:00 back to 02:00; 02:30 happens twice and runs once, the first time.
    got = runs(BERLIN_DAILY, at(2026, 10, 23, 12), at(2026, 10, 27, 12))
    assert got == [at(2026, 10, 24, 0, 30), at(2026, 10, 25, 0, 30), at(2026, 10, 26, 1, 30), at(2026, 10, 27, 1, 30)]


def test_hourly_cron_across_fall_back_runs_each_wall_clock_hour_once() -> None:
    hourly: dict[str, object] = {"kind": "cron", "cron": "0 * * * *", "timezone": "Europe/Berlin"}
    got = runs(hourly, at(2026, 10, 24, 22, 30), at(2026, 10, 25, 3, 30))
    local = [t.astimezone(parse_schedule(hourly).zone).strftime("%H %Z") for t in got]
    assert local == ["01 CEST", "02 CEST", "03 CET", "04 CET"]  # no second "02": cron's own rule


def test_interval_slots_are_aligned_and_missed_ones_run_once() -> None:
    s = parse_schedule({"kind": "interval", "every_minutes": 30})
    assert next_slot(s, at(2026, 1, 1, 10, 5)) == at(2026, 1, 1, 10, 30)
    # Controller down from 10:05 to 13:10: six slots passed; one run at start, then the next slot.
    d = decide_timed(s, now=at(2026, 1, 1, 13, 10), handled_until=at(2026, 1, 1, 10, 5), running=False)
    assert d.start and d.handled_until == at(2026, 1, 1, 13, 0)
    d2 = decide_timed(s, now=at(2026, 1, 1, 13, 11), handled_until=d.handled_until, running=False)
    assert not d2.start


def test_a_running_job_lets_its_slot_pass() -> None:
    s = parse_schedule({"kind": "interval", "every_minutes": 10})
    d = decide_timed(
        s, now=at(2026, 1, 1, 10, 0) + dt.timedelta(seconds=5), handled_until=at(2026, 1, 1, 9, 55), running=True
    )
    assert not d.start and d.handled_until == at(2026, 1, 1, 10, 0)


def test_permitted_hours_skip_slots_and_close_the_window() -> None:
    raw: dict[str, object] = {
        "kind": "interval",
        "every_minutes": 60,
        "timezone": "America/New_York",
        "permitted": {"mon": [[0, 6], [22, 24]], "tue": [[0, 6]]},
    }
    s = parse_schedule(raw)
    # Monday 2026-11-23 07:00 New York (12:00 UTC) is outside: the next slot is Monday 22:00 local.
    assert next_slot(s, at(2026, 11, 23, 12)) == at(2026, 11, 24, 3)
    assert s.window_closed(at(2026, 11, 24, 11, 30))  # Tuesday 06:30 local
    assert not s.window_closed(at(2026, 11, 24, 10, 30))  # Tuesday 05:30 local
    # A missed slot found outside the permitted hours is dropped, not run late.
    d = decide_timed(s, now=at(2026, 11, 24, 11, 30), handled_until=at(2026, 11, 24, 10, 30), running=False)
    assert not d.start
    unenforced = parse_schedule({**raw, "enforce_window": False})
    assert not unenforced.window_closed(at(2026, 11, 24, 11, 30))


def test_continuous_and_after_job() -> None:
    c = parse_schedule({"kind": "continuous", "pause_seconds": 30})
    now = at(2026, 1, 1, 12)
    assert decide_continuous(c, now=now, running=False, last_end=None).start
    assert not decide_continuous(c, now=now, running=False, last_end=now - dt.timedelta(seconds=10)).start
    assert decide_continuous(c, now=now, running=False, last_end=now - dt.timedelta(seconds=31)).start
    assert not decide_continuous(c, now=now, running=True, last_end=None).start
    a = parse_schedule({"kind": "after", "after_job": "jobs/first"})
    handled = at(2026, 1, 1, 11)
    assert not decide_after(a, now=now, running=False, handled_until=handled, upstream_end=None).start
    assert not decide_after(a, now=now, running=False, handled_until=handled, upstream_end=handled).start
    d = decide_after(a, now=now, running=False, handled_until=handled, upstream_end=at(2026, 1, 1, 11, 30))
    assert d.start and d.handled_until == at(2026, 1, 1, 11, 30)


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"kind": "weekly"}, "job.schedule.kind"),
        ({"kind": "cron", "cron": "61 * * * *"}, "job.schedule.cron"),
        ({"kind": "cron", "cron": "0 2 * * *", "timezone": "Mars/Olympus"}, "job.schedule.timezone"),
        ({"kind": "interval"}, "job.schedule.every_minutes"),
        ({"kind": "interval", "every_minutes": 1.5}, "job.schedule.every_minutes"),
        ({"kind": "after"}, "job.schedule.after_job"),
        ({"kind": "continuous", "pause_seconds": -1}, "job.schedule.pause_seconds"),
        ({"permitted": {"funday": [[0, 1]]}}, "job.schedule.permitted"),
        ({"permitted": {"mon": [[5, 3]]}}, "job.schedule.permitted.mon[0]"),
        ({"permitted": {"mon": "all"}}, "job.schedule.permitted.mon"),
        ({"every": 5}, "job.schedule"),
        ({"kind": "cron", "cron": "0 2 * * *", "every_minutes": -5}, "job.schedule.every_minutes"),
        # Valid cron expressions naming no date that exists: the job would never run (found by trying them).
        ({"kind": "cron", "cron": "0 0 30 2 *"}, "job.schedule.cron"),
        ({"kind": "cron", "cron": "0 0 31 4,6,9,11 *"}, "job.schedule.cron"),
        # What json.loads makes of the CLI's 1e999 and NaN: int() of them raised past the error root.
        ({"kind": "continuous", "pause_seconds": float("inf")}, "job.schedule.pause_seconds"),
        ({"kind": "interval", "every_minutes": float("nan")}, "job.schedule.every_minutes"),
        ({"permitted": {"mon": [[0, float("inf")]]}}, "job.schedule.permitted.mon[0]"),
        # Silently truncated or read as 1 before.
        ({"permitted": {"mon": [[0.5, 2]]}}, "job.schedule.permitted.mon[0]"),
        ({"permitted": {"mon": [[True, 2]]}}, "job.schedule.permitted.mon[0]"),
        ({"kind": "interval", "every_minutes": True}, "job.schedule.every_minutes"),
    ],
)
def test_bad_schedules_name_the_field(raw: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        parse_schedule(raw)
    assert e.value.field == field


@pytest.mark.parametrize(
    "raw",
    [
        {},
        {"kind": "cron", "cron": "30 22 * * 1-5", "timezone": "Europe/Berlin"},
        {"kind": "interval", "every_minutes": 60, "permitted": {"mon": [[0, 6], [20, 24]], "sat": [[0, 24]]}},
        {"kind": "continuous", "pause_seconds": 0, "enforce_window": False, "permitted": {}},
        {"kind": "after", "after_job": "jobs/first", "pause_seconds": 30, "enforce_window": True},
    ],
)
def test_the_stored_json_and_the_api_schedule_convert_both_ways_unchanged(raw: dict[str, object]) -> None:
    msg = schedule_message(raw)
    assert schedule_json(msg) == raw
    again = api.Schedule()
    again.ParseFromString(msg.SerializeToString())  # what a client in another language sends back
    assert schedule_json(again) == raw


def test_every_api_schedule_kind_has_its_json_name() -> None:
    assert set(KIND_NAMES) == set(api.ScheduleKind.values())
    assert sorted(KIND_NAMES.values()) == sorted(KINDS)


@pytest.mark.parametrize(
    ("msg", "field"),
    [
        # A kind its client library did not know (a misspelt name) arrives unspecified: never manual-only then.
        (api.Schedule(cron="0 22 * * *"), "job.schedule.kind"),
        (api.Schedule(every_minutes=5), "job.schedule.kind"),
        (api.Schedule(kind=99), "job.schedule.kind"),  # type: ignore[arg-type]
        (api.Schedule(kind=api.SCHEDULE_KIND_CRON, cron="every night"), "job.schedule.cron"),
        (api.Schedule(kind=api.SCHEDULE_KIND_CONTINUOUS, pause_seconds=86401), "job.schedule.pause_seconds"),
        (api.Schedule(kind=api.SCHEDULE_KIND_INTERVAL, every_minutes=2**31), "job.schedule.every_minutes"),
        (api.Schedule(kind=api.SCHEDULE_KIND_CRON, cron="0 0 30 2 *"), "job.schedule.cron"),
        # A field its kind never reads (found by sending them): stored and shown, silently unused.
        (api.Schedule(kind=api.SCHEDULE_KIND_INTERVAL, every_minutes=5, cron="0 2 * * *"), "job.schedule.cron"),
        (api.Schedule(kind=api.SCHEDULE_KIND_CONTINUOUS, after_job="jobs/first"), "job.schedule.after_job"),
        (
            api.Schedule(kind=api.SCHEDULE_KIND_AFTER_JOB, after_job="jobs/a", every_minutes=5),
            "job.schedule.every_minutes",
        ),
        (
            api.Schedule(
                permitted=api.PermittedHours(
                    tue=[api.HourSpan(start_hour=0, end_hour=1), api.HourSpan(start_hour=9, end_hour=9)]
                )
            ),
            "job.schedule.permitted.tue[1]",
        ),
    ],
)
def test_bad_api_schedules_name_the_field(msg: api.Schedule, field: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        schedule_json(msg)
    assert e.value.field == field
