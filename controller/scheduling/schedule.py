"""Job schedules: when a job is due, and whether its backup window is open. Pure; the clock is an argument.

A schedule (the job's `schedule` field, JSON):

    {"kind": "cron", "cron": "30 22 * * 1-5", "timezone": "Europe/Berlin",
     "permitted": {"mon": [[0, 6], [20, 24]], "sat": [[0, 24]]}}

kinds: "" (manual only), "cron" (a cron expression in `timezone`), "interval" (`every_minutes`, slots
at whole multiples since the Unix epoch, so "every 60" runs on the hour), "continuous" (again as soon
as the last run ended, after `pause_seconds`), "after" (when `after_job`'s session ends).
`permitted` lists, per weekday, the local hours [start, end) a session may run; no `permitted`: always.
When the permitted hours end, running sessions are stopped (resumable) unless `enforce_window` is false.

Cron times are wall-clock times in the schedule's zone, as cron itself treats them: a time that does not
exist (the spring-forward gap) runs when the clock jumps past it, a time that exists twice (fall-back)
runs once, at its first occurrence. A run is never skipped or doubled by a DST change.

The API carries a schedule as the typed `vmrepl.v1.Schedule`; the database keeps the JSON above (the CLI's
`--schedule` grammar). `schedule_json` and `schedule_message` convert between them, here and only here.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from typing import TypeGuard
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, croniter

from vmrepl.errors import InvalidArgument
from vmrepl.v1 import controller_pb2 as api

KINDS = ("", "cron", "interval", "continuous", "after")
# The API's kinds and their JSON names; SCHEDULE_KIND_UNSPECIFIED is manual.
KIND_NAMES: dict[api.ScheduleKind.ValueType, str] = {
    api.SCHEDULE_KIND_UNSPECIFIED: "",
    api.SCHEDULE_KIND_CRON: "cron",
    api.SCHEDULE_KIND_INTERVAL: "interval",
    api.SCHEDULE_KIND_CONTINUOUS: "continuous",
    api.SCHEDULE_KIND_AFTER_JOB: "after",
}
# The field only its kind reads (the API refuses it with another kind).
_OWN_KIND = {"cron": "cron", "every_minutes": "interval", "after_job": "after"}
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_MAX_STEPS = 100_000  # slots looked at when searching (a year of every-5-minutes is 105 120)
FIELD = "job.schedule"


@dataclass(frozen=True)
class Schedule:
    kind: str = ""
    cron: str = ""
    every_minutes: int = 0
    pause_seconds: int = 10
    after_job: str = ""
    timezone: str = "UTC"
    # weekday index (0 = Monday) -> [(start hour, end hour)], local time; None: always permitted
    permitted: dict[int, tuple[tuple[int, int], ...]] | None = None
    enforce_window: bool = True
    zone: ZoneInfo = field(default=ZoneInfo("UTC"), compare=False)

    def permitted_at(self, at: dt.datetime) -> bool:
        if self.permitted is None:
            return True
        local = at.astimezone(self.zone)
        return any(start <= local.hour < end for start, end in self.permitted.get(local.weekday(), ()))

    def window_closed(self, at: dt.datetime) -> bool:
        """Whether running sessions must stop now (the permitted hours ended)."""
        return self.enforce_window and not self.permitted_at(at)


def _hours(where: str, spans: object) -> tuple[tuple[int, int], ...]:
    if not isinstance(spans, list):
        raise InvalidArgument(where, "must be a list of [start hour, end hour] pairs")
    out = []
    for i, span in enumerate(spans):
        if not (isinstance(span, list) and len(span) == 2 and all(_whole(h) for h in span)):
            raise InvalidArgument(f"{where}[{i}]", "must be [start hour, end hour]")
        start, end = int(span[0]), int(span[1])
        if not 0 <= start < end <= 24:
            raise InvalidArgument(f"{where}[{i}]", "hours must satisfy 0 <= start < end <= 24")
        out.append((start, end))
    return tuple(out)


def _permitted(raw: object) -> dict[int, tuple[tuple[int, int], ...]] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise InvalidArgument(f"{FIELD}.permitted", "must map weekdays (mon..sun) to hour spans")
    out = {}
    for day, spans in raw.items():
        if day not in DAYS:
            raise InvalidArgument(f"{FIELD}.permitted", f"{day!r} is not a weekday (mon..sun)")
        out[DAYS.index(day)] = _hours(f"{FIELD}.permitted.{day}", spans)
    return out


def parse_schedule(raw: dict[str, object]) -> Schedule:
    """Validate a job's schedule; errors name the field (job.schedule.cron …)."""
    unknown = set(raw) - {
        "kind",
        "cron",
        "every_minutes",
        "pause_seconds",
        "after_job",
        "timezone",
        "permitted",
        "enforce_window",
    }
    if unknown:
        raise InvalidArgument(FIELD, f"unknown keys: {', '.join(sorted(unknown))}")
    kind = str(raw.get("kind", ""))
    if kind not in KINDS:
        raise InvalidArgument(f"{FIELD}.kind", f"must be one of {', '.join(k or '(empty)' for k in KINDS)}")
    tz_name = str(raw.get("timezone", "UTC"))
    try:
        zone = ZoneInfo(tz_name)
    except (ZoneInfoNotFoundError, ValueError) as e:
        raise InvalidArgument(f"{FIELD}.timezone", f"{tz_name!r} is not an IANA time zone") from e
    s = Schedule(
        kind=kind,
        cron=str(raw.get("cron", "")),
        every_minutes=_int(raw, "every_minutes", 0),
        pause_seconds=_int(raw, "pause_seconds", 10),
        after_job=str(raw.get("after_job", "")),
        timezone=tz_name,
        permitted=_permitted(raw.get("permitted")),
        enforce_window=bool(raw.get("enforce_window", True)),
        zone=zone,
    )
    if kind == "cron":
        _check_cron(s.cron)
    lowest = 1 if kind == "interval" else 0
    if not lowest <= s.every_minutes <= 31 * 24 * 60:
        raise InvalidArgument(f"{FIELD}.every_minutes", f"must be from {lowest} to 44640 (31 days)")
    if not 0 <= s.pause_seconds <= 86400:
        raise InvalidArgument(f"{FIELD}.pause_seconds", "must be from 0 to 86400")
    if kind == "after" and not s.after_job:
        raise InvalidArgument(f"{FIELD}.after_job", "names the job this one follows (jobs/ID)")
    return s


def _check_cron(cron: str) -> None:
    if not croniter.is_valid(cron):
        raise InvalidArgument(f"{FIELD}.cron", f"{cron!r} is not a cron expression")
    try:  # valid, yet naming no date that exists (30 February): the job would never run, and say nothing
        croniter(cron, dt.datetime(2000, 1, 1)).get_next(dt.datetime)
    except CroniterBadDateError as e:
        raise InvalidArgument(f"{FIELD}.cron", f"{cron!r} never fires: it names no date that exists") from e


def _whole(value: object) -> TypeGuard[int | float]:
    """A JSON number that is a whole number: not a bool, not NaN or infinity (JSON from the CLI may hold
    1e999, and int() of it raised OverflowError past the error root: a traceback)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return isinstance(value, int) or (math.isfinite(value) and value == int(value))


def _int(raw: dict[str, object], key: str, default: int) -> int:
    value = raw.get(key, default)
    if not _whole(value):
        raise InvalidArgument(f"{FIELD}.{key}", "must be a whole number")
    return int(value)


def _slots(s: Schedule, after: dt.datetime) -> croniter | None:
    if s.kind != "cron":
        return None
    return croniter(s.cron, after.astimezone(s.zone).replace(tzinfo=None))


def next_slot(s: Schedule, after: dt.datetime) -> dt.datetime | None:
    """The first permitted slot strictly after `after` (UTC), or None (manual, continuous, after-job, or
    none within the search horizon)."""
    if s.kind == "interval":
        step = s.every_minutes * 60
        t = (int(after.timestamp()) // step + 1) * step
        for _ in range(_MAX_STEPS):
            at = dt.datetime.fromtimestamp(t, dt.UTC)
            if s.permitted_at(at):
                return at
            t += step
        return None
    it = _slots(s, after)
    if it is None:
        return None
    for _ in range(_MAX_STEPS):
        wall: dt.datetime = it.get_next(dt.datetime)
        # fold=0: a repeated wall time is its first occurrence; a missing one maps past the gap.
        at = wall.replace(tzinfo=s.zone).astimezone(dt.UTC)
        if at > after and s.permitted_at(at):
            return at
    return None


@dataclass(frozen=True)
class Decision:
    start: bool
    # The newest slot now handled (run or skipped): the next decision only looks at later ones.
    handled_until: dt.datetime | None
    reason: str = ""


def decide_timed(s: Schedule, *, now: dt.datetime, handled_until: dt.datetime, running: bool) -> Decision:
    """Cron and interval jobs. Slots that came due since `handled_until` (missed while the controller was
    down, or just now) start one run, not one per slot, and only inside the permitted hours; a job
    already running lets them pass."""
    due: dt.datetime | None = None
    probe = handled_until
    for _ in range(_MAX_STEPS):
        nxt = next_slot(s, probe)
        if nxt is None or nxt > now:
            break
        due = probe = nxt
    if due is None:
        return Decision(False, handled_until)
    if running:
        return Decision(False, due, "already running")
    if not s.permitted_at(now):
        return Decision(False, due, "outside the permitted hours")
    return Decision(True, due, "scheduled")


def decide_continuous(s: Schedule, *, now: dt.datetime, running: bool, last_end: dt.datetime | None) -> Decision:
    if running or not s.permitted_at(now):
        return Decision(False, None)
    if last_end is not None and (now - last_end).total_seconds() < s.pause_seconds:
        return Decision(False, None)
    return Decision(True, None, "continuous")


def decide_after(
    s: Schedule, *, now: dt.datetime, running: bool, handled_until: dt.datetime, upstream_end: dt.datetime | None
) -> Decision:
    """Run once each time the upstream job's session ends (after the last one handled)."""
    if upstream_end is None or upstream_end <= handled_until:
        return Decision(False, handled_until)
    if running or not s.permitted_at(now):
        return Decision(False, upstream_end, "already running" if running else "outside the permitted hours")
    return Decision(True, upstream_end, "after job")


def schedule_json(msg: api.Schedule) -> dict[str, object]:
    """The stored JSON of an API schedule; validated as parse_schedule does, errors naming the field."""
    kind = KIND_NAMES.get(msg.kind)
    if kind is None:  # a number from a newer client, or a name its library did not know
        raise InvalidArgument(f"{FIELD}.kind", f"{msg.kind} is not a schedule kind")
    set_fields = [f for f in ("cron", "every_minutes", "after_job") if getattr(msg, f)]
    if not kind and set_fields:
        # A kind the client misspelt arrives unspecified: refused, not a job silently made manual-only.
        raise InvalidArgument(f"{FIELD}.kind", f"is unspecified (manual only), but {set_fields[0]} is set")
    stray = [f for f in set_fields if _OWN_KIND[f] != kind]
    if kind and stray:
        # A cron on an interval job, say: stored, shown, and never used; the operator meant another kind.
        raise InvalidArgument(f"{FIELD}.{stray[0]}", f"is set, but the kind is {kind}, which does not use it")
    raw: dict[str, object] = {"kind": kind} if kind else {}
    raw.update({f: getattr(msg, f) for f in set_fields})
    if msg.timezone:
        raw["timezone"] = msg.timezone
    if msg.HasField("pause_seconds"):
        raw["pause_seconds"] = msg.pause_seconds
    if msg.HasField("permitted"):
        days = {day: getattr(msg.permitted, day) for day in DAYS}
        raw["permitted"] = {day: [[h.start_hour, h.end_hour] for h in spans] for day, spans in days.items() if spans}
    if msg.HasField("enforce_window"):
        raw["enforce_window"] = msg.enforce_window
    parse_schedule(raw)
    return raw


def schedule_message(raw: dict[str, object]) -> api.Schedule:
    """The API schedule of stored (or CLI) JSON; validated first, errors naming the field."""
    s = parse_schedule(raw)
    msg = api.Schedule(
        kind=next(k for k, name in KIND_NAMES.items() if name == s.kind),
        cron=s.cron,
        every_minutes=s.every_minutes,
        after_job=s.after_job,
        timezone=str(raw.get("timezone", "")),
    )
    if "pause_seconds" in raw:
        msg.pause_seconds = s.pause_seconds
    if "enforce_window" in raw:
        msg.enforce_window = s.enforce_window
    if s.permitted is not None:
        msg.permitted.SetInParent()  # present though empty: no hour is permitted
        for day, spans in s.permitted.items():
            getattr(msg.permitted, DAYS[day]).extend(api.HourSpan(start_hour=a, end_hour=b) for a, b in spans)
    return msg
