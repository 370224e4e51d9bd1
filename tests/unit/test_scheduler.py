"""The scheduler loop on a real (SQLite) database with a controllable clock and a recording engine."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from sqlalchemy import select

from controller.db.connect import open_database
from controller.db.enums import SessionKind, SessionState
from controller.db.models import Host, Job, JobVm, Session, Target
from controller.engine.journal import Journal
from controller.engine.states import ACTIVE_SESSION
from controller.scheduling.scheduler import Scheduler
from tests.support.clock import Clock
from tests.support.controller_db import seeded_sqlite_url

T0 = dt.datetime(2026, 11, 23, 21, 0, tzinfo=dt.UTC)  # a Monday


class RecordingEngine:
    """Starts and stops sessions as rows only: which jobs the scheduler starts, and when."""

    def __init__(self, journal: Journal, clock: Clock) -> None:
        self.journal = journal
        self.clock = clock
        self.started: list[tuple[str, dt.datetime]] = []
        self.stopped: list[tuple[str, dt.datetime]] = []

    async def start_job(self, job_id: str) -> Session:
        async with self.journal.write() as db:
            job = await db.get(Job, job_id)
            assert job is not None
            s = Session(job_id=job_id, state=SessionState.RUNNING, started_at=self.clock())
            db.add(s)
        self.started.append((job.name, self.clock()))
        return s

    async def stop_job(self, job_id: str) -> Session:
        """Marks the session stopping (the real engine then takes a while to end it)."""
        async with self.journal.write() as db:
            s = await db.scalar(select(Session).where(Session.job_id == job_id, Session.state == SessionState.RUNNING))
            assert s is not None, "stop_job called for a session that is not running"
            s.state = SessionState.STOPPING
            job = await db.get(Job, job_id)
        assert job is not None
        self.stopped.append((job.name, self.clock()))
        return s

    async def end(self, job_id: str, state: SessionState) -> Session:
        async with self.journal.write() as db:
            q = select(Session).where(
                Session.job_id == job_id, Session.kind == SessionKind.REPLICATION, Session.state.in_(ACTIVE_SESSION)
            )
            s = await db.scalar(q)
            assert s is not None
            s.state, s.ended_at = state, self.clock()
        return s


async def _setup(tmp_path: Path, schedules: dict[str, dict[str, object]]) -> tuple[Journal, dict[str, str]]:
    _, sessions = await open_database(await seeded_sqlite_url(tmp_path / "c.db"))
    journal = Journal(sessions)
    ids = {}
    async with journal.write() as db:
        host, target = Host(name="h", provider="file", address="/x"), Target(name="t", address="a:1")
        db.add_all([host, target])
        await db.flush()
        for name, schedule in schedules.items():
            job = Job(
                name=name,
                host_id=host.id,
                target_id=target.id,
                replica_root=f"r/{name}",
                schedule=schedule,
                created_at=T0,
                vms=[JobVm(vm_ref="vm")],
            )
            db.add(job)
            await db.flush()
            ids[name] = job.id
    return journal, ids


async def test_scheduled_jobs_start_on_time_and_never_twice_at_once(tmp_path: Path) -> None:
    journal, ids = await _setup(
        tmp_path,
        {
            "every15": {"kind": "interval", "every_minutes": 15},
            "manual": {},
            "nightly": {"kind": "cron", "cron": "30 22 * * *"},
        },
    )
    clock = Clock(T0)
    engine = RecordingEngine(journal, clock)
    sched = Scheduler(journal=journal, engine=engine, clock=clock)
    for _ in range(2 * 60):  # two hours, a tick a minute
        await sched.tick_once()
        clock.advance(minutes=1)
        runs = [t for n, t in engine.started if n == "every15"]
        if runs and clock.now - runs[-1] == dt.timedelta(minutes=20):  # each run takes 20 minutes
            await engine.end(ids["every15"], SessionState.SUCCEEDED)
    every15 = [t for n, t in engine.started if n == "every15"]
    # The :30 and :00 slots find the previous run still going: they pass, never a second concurrent run.
    assert every15 == [T0 + dt.timedelta(minutes=m) for m in (15, 45, 75, 105)]
    assert [t for n, t in engine.started if n == "nightly"] == [dt.datetime(2026, 11, 23, 22, 30, tzinfo=dt.UTC)]
    assert not [n for n, _ in engine.started if n == "manual"]


async def test_missed_slots_run_once_when_the_controller_is_back(tmp_path: Path) -> None:
    journal, ids = await _setup(tmp_path, {"hourly": {"kind": "interval", "every_minutes": 60}})
    clock = Clock(T0 + dt.timedelta(minutes=1))
    engine = RecordingEngine(journal, clock)
    sched = Scheduler(journal=journal, engine=engine, clock=clock)
    await sched.tick_once()
    assert not engine.started
    clock.advance(hours=5)  # controller down for five hours: five slots missed
    await sched.tick_once()
    assert engine.started == [("hourly", T0 + dt.timedelta(hours=5, minutes=1))]
    await engine.end(ids["hourly"], SessionState.SUCCEEDED)
    clock.advance(minutes=1)
    await sched.tick_once()
    assert len(engine.started) == 1  # not once per missed slot
    clock.advance(hours=1)
    await sched.tick_once()
    assert len(engine.started) == 2


async def test_the_window_closing_stops_a_running_session(tmp_path: Path) -> None:
    # Permitted Monday 21:00-23:00 UTC only.
    sched_raw = {"kind": "interval", "every_minutes": 60, "permitted": {"mon": [[21, 23]]}}
    journal, _ids = await _setup(tmp_path, {"w": sched_raw})
    clock = Clock(T0 + dt.timedelta(minutes=59))
    engine = RecordingEngine(journal, clock)
    sched = Scheduler(journal=journal, engine=engine, clock=clock)
    for _ in range(90):
        await sched.tick_once()
        clock.advance(minutes=1)
    assert engine.started == [("w", T0 + dt.timedelta(hours=1))]  # the 22:00 slot; it never ends by itself
    # 23:00, the window closed: stopped once, though the session takes its time to end
    assert engine.stopped == [("w", T0 + dt.timedelta(hours=2))]
    await engine.end(_ids["w"], SessionState.INCOMPLETE)
    for _ in range(60):  # no new start outside the permitted hours
        await sched.tick_once()
        clock.advance(minutes=1)
    assert len(engine.started) == 1


async def test_continuous_and_after_another_job(tmp_path: Path) -> None:
    journal, ids = await _setup(
        tmp_path,
        {"first": {"kind": "continuous", "pause_seconds": 60}, "second": {"kind": "after", "after_job": "jobs/first"}},
    )
    clock = Clock(T0)
    engine = RecordingEngine(journal, clock)
    sched = Scheduler(journal=journal, engine=engine, clock=clock)
    await sched.tick_once()
    assert engine.started == [("first", T0)]
    clock.advance(minutes=10)
    await engine.end(ids["first"], SessionState.SUCCEEDED)
    clock.advance(seconds=1)
    await sched.tick_once()
    assert engine.started[-1] == ("second", clock.now)  # after first ended; first pauses 60 s
    clock.advance(seconds=60)
    await sched.tick_once()
    assert engine.started[-1] == ("first", clock.now)
    await sched.tick_once()
    assert len(engine.started) == 3  # second runs once per run of first


async def test_an_operation_session_neither_takes_a_slot_nor_is_stopped_by_the_window(tmp_path: Path) -> None:
    """A failover or a long failback of one VM runs as a session of the job: the schedule's runs go on, and a
    closing window stops replication sessions only."""
    window = {"kind": "interval", "every_minutes": 15, "permitted": {"mon": [[21, 22]]}}  # Monday 21:00-22:00
    journal, ids = await _setup(tmp_path, {"every15": window})
    async with journal.write() as db:
        db.add(Session(job_id=ids["every15"], state=SessionState.RUNNING, kind=SessionKind.OPERATION, started_at=T0))
    clock = Clock(T0)
    engine = RecordingEngine(journal, clock)
    sched = Scheduler(journal=journal, engine=engine, clock=clock)
    for _ in range(50):
        await sched.tick_once()
        clock.advance(minutes=1)
        if engine.started and clock.now - engine.started[-1][1] == dt.timedelta(minutes=2):
            await engine.end(ids["every15"], SessionState.SUCCEEDED)
    assert [t for _, t in engine.started] == [T0 + dt.timedelta(minutes=m) for m in (15, 30, 45)]
    assert not engine.stopped  # the operation session was never asked to stop
