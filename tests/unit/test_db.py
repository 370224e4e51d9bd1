"""The configuration database on a real SQLite file: migrations, models, secrets at rest."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from cryptography.fernet import Fernet
from sqlalchemy import JSON, Integer, column, func, insert, inspect, select, table, text
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from controller.api import paging
from controller.api.base import BY_NAME, RESTORE_POINTS, SESSIONS
from controller.db.connect import downgrade, make_engine, migrate, open_database, sqlite_url
from controller.db.enums import Notification, ReplicaEnd, SessionKind, SessionState, TaskState, VmState
from controller.db.models import (
    Base,
    Credential,
    HeldCheckpoint,
    Host,
    Job,
    JobVm,
    RestorePoint,
    Session,
    SessionVm,
    Target,
    Task,
)
from controller.db.secrets import SecretBox, create_key_file
from tests.support.database import BACKENDS, new_pg_database, remove_pg_database
from vmrepl.errors import ConfigError, SecurityError


@pytest.fixture(params=BACKENDS)
async def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield sqlite_url(tmp_path / "c.db")
        return
    base = os.environ["VMREPL_TEST_DATABASE_URL"]
    url, name = await new_pg_database(base)  # a fresh, empty database for every test
    try:
        yield url
    finally:
        await remove_pg_database(base, name)


async def test_migrations_build_exactly_the_models(db_url: str) -> None:
    engine, _ = await open_database(db_url)
    try:
        async with engine.connect() as conn:
            tables = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
            diff = await conn.run_sync(
                lambda c: compare_metadata(MigrationContext.configure(c, opts={"compare_type": True}), Base.metadata)
            )
        assert {"jobs", "sessions", "tasks", "credentials", "restore_points", "held_checkpoints"} <= tables
        assert diff == [], f"models and migrations differ; add a migration: {diff}"
    finally:
        await engine.dispose()
    # Applying again is a no-op.
    engine, _ = await open_database(db_url)
    await engine.dispose()


async def test_jobs_credentials_and_foreign_keys(tmp_path: Path, db_url: str) -> None:
    key_file = tmp_path / "secret.key"
    create_key_file(key_file)
    box = SecretBox.from_file(key_file)
    engine, sessions = await open_database(db_url)
    try:
        async with sessions() as s, s.begin():
            cred = Credential(name="hv-admin", username="CORP\\svc-vmrepl", secret=box.seal("Pa55-w0rd!x"))
            host = Host(name="hv1", provider="hyperv", address="hv1.corp", credential_id=None)
            target = Target(name="dr1", address="dr1:7402")
            s.add_all([cred, target, host])
            await s.flush()
            host.credential_id = cred.id
            job = Job(name="web", host_id=host.id, target_id=target.id, replica_root="jobs/web")
            job.vms.append(JobVm(vm_ref="web01", excluded_disks=["disk2"]))
            s.add(job)
        async with sessions() as s:
            job = (await s.execute(select(Job).where(Job.name == "web"))).scalar_one()
            assert [v.vm_ref for v in job.vms] == ["web01"] and job.vms[0].excluded_disks == ["disk2"]
            stored = (await s.execute(select(Credential))).scalar_one()
            assert box.open(stored.secret) == "Pa55-w0rd!x"
        with pytest.raises(IntegrityError):  # a host still used by a job cannot go
            async with sessions() as s, s.begin():
                await s.delete(await s.get(Host, job.host_id))
    finally:
        await engine.dispose()
    for f in tmp_path.glob("c.db*"):  # the database and any WAL or journal beside it
        assert b"Pa55-w0rd!x" not in f.read_bytes()  # never at rest in clear


def test_secret_keys_rotate_and_wrong_keys_fail(tmp_path: Path) -> None:
    old, new = Fernet.generate_key(), Fernet.generate_key()
    sealed_old = SecretBox([old]).seal("s3cret")
    rotated = SecretBox([new, old])
    assert rotated.open(sealed_old) == "s3cret"
    assert SecretBox([new]).open(rotated.seal("x")) == "x"
    with pytest.raises(SecurityError):
        SecretBox([new]).open(sealed_old)
    with pytest.raises(ConfigError):
        SecretBox([b"not-a-key"])
    with pytest.raises(ConfigError):
        SecretBox.from_file(tmp_path / "missing.key")


HOOK_URL = "https://hookuser:hook-pw-1d7c@hooks.example:8443/notify/T0K-path?token=tok-q-5e2a"


async def _job_with_clear_webhook(engine: AsyncEngine) -> None:
    """A job as revision 0005 stored it: the webhook URL in clear (only that revision's columns named)."""
    columns = ["id", "name", "host_id", "target_id", "replica_root", "restore_points_to_keep", "compression"]
    columns += ["block_size", "bandwidth_limit_mbps", "change_tracking", "checkpoint_deadline_seconds", "enabled"]
    dicts = ("guest_processing", "exclusions", "schedule", "webhook")
    jobs = table("jobs", *(column(c) for c in columns), *(column(c, JSON) for c in dicts), column("created_at"))
    async with engine.begin() as conn:
        now = {"t": dt.datetime.now(dt.UTC)}
        await conn.execute(
            text("INSERT INTO hosts (id, name, provider, address, created_at) VALUES ('h', 'h', 'file', '/x', :t)"), now
        )
        await conn.execute(
            text("INSERT INTO targets (id, name, address, tls_server_name, max_tasks) VALUES ('t', 't', 'a:1', '', 4)")
        )
        values = ("j", "j", "h", "t", "r/j", 7, "default", 1 << 20, 0.0, "auto", 86400, True)
        await conn.execute(
            insert(jobs).values(
                **dict(zip(columns, values, strict=True)),
                **{key: {} for key in dicts[:3]},
                webhook={"url": HOOK_URL, "failures_only": True},
                created_at=now["t"],
            )
        )


async def test_migration_seals_stored_webhook_urls_and_needs_the_key(tmp_path: Path, db_url: str) -> None:
    box = SecretBox([Fernet.generate_key()])
    engine = make_engine(db_url)
    try:
        await migrate(engine, "0005")
        await _job_with_clear_webhook(engine)
        with pytest.raises(ConfigError, match="needs the secret key"):
            await migrate(engine)  # rows to seal and no key: refused, nothing changed
        await migrate(engine, secrets=box)
        async with engine.connect() as conn:
            stored = (await conn.execute(select(column("webhook", JSON)).select_from(table("jobs")))).scalar_one()
        assert set(stored) == {"sealed_url", "shown_url", "failures_only"} and stored["failures_only"] is True
        assert box.open(stored["sealed_url"].encode()) == HOOK_URL
        assert stored["shown_url"] == "https://hooks.example:8443/…"
        async with engine.connect() as conn:  # 0008 renamed the hold's column and kept its value
            hold = select(column("checkpoint_hold_seconds", Integer)).select_from(table("jobs"))
            assert (await conn.execute(hold)).scalar_one() == 86400
        await downgrade(engine, "0005", secrets=box)  # and back, for an operator who must downgrade
        async with engine.connect() as conn:
            assert (await conn.execute(select(column("webhook", JSON)).select_from(table("jobs")))).scalar_one()[
                "url"
            ] == HOOK_URL
        await migrate(engine, secrets=box)
    finally:
        await engine.dispose()
    for f in tmp_path.glob("c.db*"):  # SQLite: the clear URL's old bytes were overwritten, not left free
        data = f.read_bytes()
        assert b"hook-pw-1d7c" not in data and b"tok-q-5e2a" not in data, f


@pytest.mark.parametrize(
    ("keyset", "where", "index"),
    [
        (SESSIONS, None, "ix_sessions_started_at_id"),
        (SESSIONS, Session.job_id == "j", "ix_sessions_job_id_started_at_id"),
        (RESTORE_POINTS, RestorePoint.job_id == "j", "ix_restore_points_job_id_created_at_id"),
        (BY_NAME[Job], None, "sqlite_autoindex_jobs"),
    ],
)
async def test_a_page_deep_in_a_list_is_an_index_range_read(
    tmp_path: Path, keyset: paging.Keyset, where: Any, index: str
) -> None:
    """SQLite's plan for the page after a token: a search in the index, no scan, no sort."""
    engine, _ = await open_database(sqlite_url(tmp_path / "c.db"))
    try:
        row = keyset.model(**{c.key: "x" for c in keyset.columns})
        for c in keyset.columns:
            if c.type.python_type is dt.datetime:
                setattr(row, c.key, dt.datetime(2026, 11, 30, tzinfo=dt.UTC))
        q = paging.page_query(keyset, limit=100, token=keyset.token(row), where=where)
        compiled = q.compile(dialect=engine.dialect)
        params = tuple(
            v.strftime("%Y-%m-%d %H:%M:%S.%f") if isinstance(v, dt.datetime) else v
            for v in (compiled.params[k] for k in compiled.positiontup or ())
        )
        async with engine.connect() as conn:
            plan = " ".join(
                str(list(r)[3]) for r in await conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}", params)
            )
        assert plan.startswith(f"SEARCH {keyset.model.__tablename__} USING") and index in plan, plan
        assert "TEMP B-TREE" not in plan, plan
    finally:
        await engine.dispose()


_LOG_PROBE = """
import asyncio, logging, sys
from sqlalchemy import text
from controller.db.connect import make_engine
from vmrepl.logs import configure_logging

configure_logging(level="debug")
logging.getLogger("sqlalchemy.engine").setLevel(logging.INFO)  # SQL echo turned on: statements, never values


async def main() -> None:
    engine = make_engine(sys.argv[1])
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE probe_t (v TEXT)"))
        await conn.execute(text("INSERT INTO probe_t VALUES (:v)"), {"v": "param-5ecret-41"})
        try:
            await conn.execute(text("INSERT INTO probe_none VALUES (:v)"), {"v": "param-5ecret-41"})
        except Exception:
            logging.getLogger("probe").exception("statement_failed")
        await conn.rollback()
    await engine.dispose()


asyncio.run(main())
"""


def test_no_library_logs_statement_parameters_at_debug_level(db_url: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _LOG_PROBE, db_url], capture_output=True, text=True, timeout=60, check=True
    )
    logged = out.stdout + out.stderr
    assert "INSERT INTO probe_t" in logged and "statement_failed" in logged, logged  # it did log, at debug
    assert "param-5ecret-41" not in logged, logged


async def _job(sessions: Any) -> str:
    async with sessions() as s, s.begin():
        host, target = Host(name="h", provider="file", address="/x"), Target(name="t", address="a:1")
        s.add_all([host, target])
        await s.flush()
        job = Job(name="j", host_id=host.id, target_id=target.id, replica_root="r/j")
        s.add(job)
        await s.flush()
        return job.id


async def test_times_come_back_aware_utc_and_naive_ones_are_refused(db_url: str) -> None:
    engine, sessions = await open_database(db_url)
    try:
        job_id = await _job(sessions)
        berlin = dt.timezone(dt.timedelta(hours=1))
        started = dt.datetime(2026, 11, 30, 21, 15, 30, 123456, tzinfo=berlin)
        async with sessions() as s, s.begin():
            s.add(Session(id="s1", job_id=job_id, state=SessionState.SUCCEEDED, started_at=started, ended_at=started))
        async with sessions() as s:
            row = await s.get(Session, "s1")
            assert row is not None and row.started_at == started and row.started_at.tzinfo is dt.UTC
            assert row.started_at.hour == 20  # the same instant, in UTC
            latest = await s.scalar(select(func.max(Session.ended_at)))  # an aggregate keeps the column's type
            assert latest == started and latest.tzinfo is dt.UTC
            # Compared in SQL with an aware value in another zone: the same instant matches.
            assert await s.scalar(select(Session.id).where(Session.started_at == started.astimezone(dt.UTC))) == "s1"
        if db_url.startswith("sqlite"):  # stored as earlier versions did: the UTC wall time, no zone
            async with engine.connect() as conn:
                stored = (await conn.exec_driver_sql("SELECT started_at FROM sessions")).scalar_one()
            assert stored == "2026-11-30 20:15:30.123456"
        with pytest.raises(StatementError, match="naive datetime"):
            async with sessions() as s, s.begin():
                s.add(Session(job_id=job_id, state=SessionState.RUNNING, started_at=dt.datetime(2026, 11, 30)))
    finally:
        await engine.dispose()


async def test_states_come_back_as_enums_and_the_database_refuses_others(db_url: str) -> None:
    engine, sessions = await open_database(db_url)
    try:
        job_id = await _job(sessions)
        async with sessions() as s, s.begin():
            s.add(Session(id="s1", job_id=job_id, state=SessionState.RUNNING, notification=Notification.PENDING))
            s.add(SessionVm(session_id="s1", vm_id="v", vm_name="v", state=VmState.CHECKPOINTING))
            s.add(Task(session_id="s1", vm_id="v", vm_name="v", disk_id="d", state=TaskState.RESUMABLE))
        async with sessions() as s:
            session = await s.get(Session, "s1")
            vm = await s.scalar(select(SessionVm))
            task = await s.scalar(select(Task))
        assert session is not None and vm is not None and task is not None
        assert session.state is SessionState.RUNNING and session.notification is Notification.PENDING
        assert vm.state is VmState.CHECKPOINTING and task.state is TaskState.RESUMABLE
        with pytest.raises(StatementError):  # refused before SQL: not a value of the enum
            async with sessions() as s, s.begin():
                row = await s.get(Session, "s1")
                assert row is not None
                row.state = "paused"  # type: ignore[assignment]
        for statement in (  # and by the database, for a writer that is not this code
            "UPDATE sessions SET state = 'paused'",
            "UPDATE sessions SET notification = 'maybe'",
            "UPDATE session_vms SET state = 'Running'",
            "UPDATE tasks SET state = ''",
        ):
            with pytest.raises(IntegrityError):
                async with engine.begin() as conn:
                    await conn.execute(text(statement))
    finally:
        await engine.dispose()


_PREVIOUS_HEAD_ROWS = """
INSERT INTO hosts (id, name, provider, address, created_at) VALUES ('h', 'h', 'file', '/x', :t);
INSERT INTO targets (id, name, address, tls_server_name, max_tasks) VALUES ('t', 't', 'a:1', '', 4);
INSERT INTO jobs (id, name, host_id, target_id, replica_root, restore_points_to_keep, compression, block_size,
    bandwidth_limit_mbps, change_tracking, guest_processing, exclusions, schedule, checkpoint_deadline_seconds,
    retries, retry_wait_seconds, webhook, enabled, created_at)
    VALUES ('j', 'j', 'h', 't', 'r/j', 7, 'default', 1048576, 0, 'auto', '{}', '{}', '{}', 86400, 2, 60, '{}',
    true, :t);
INSERT INTO sessions (id, job_id, state, started_at, ended_at, error, stats, notification)
    VALUES ('s1', 'j', 'incomplete', :t, :t, '', '{}', 'pending');
INSERT INTO sessions (id, job_id, state, started_at, error, stats, notification)
    VALUES ('s2', 'j', 'running', :t, '', '{}', '');
INSERT INTO session_vms (id, session_id, vm_id, vm_name, state, checkpoint_id, checkpoint_reference,
    checkpoint_reused, restore_point_id, error, attempt)
    VALUES ('v1', 's1', 'vm', 'vm', 'held', 'c1', 'ref', false, '', '', 1);
INSERT INTO tasks (id, session_id, vm_id, vm_name, disk_id, state, transfer_id, checkpoint_id, committed_offset,
    disk_size, stats, error, start, change_mode, since_reference, resume_session_id)
    VALUES ('k1', 's1', 'vm', 'vm', 'd0', 'resumable', 'x', 'c1', 4096, 8192, '{}', '', 'fresh', 'full', '', '');
INSERT INTO held_checkpoints (id, job_id, vm_id, checkpoint_id, reference, session_id, deadline)
    VALUES ('hc', 'j', 'vm', 'c1', 'ref', 's1', :t);
INSERT INTO restore_points (id, job_id, vm_id, session_id, created_at, reference) VALUES ('p1', 'j', 'vm', 's1', :t, '')
"""
_CHILD_TABLES = ("sessions", "session_vms", "tasks", "held_checkpoints", "restore_points")


async def _counts(engine: AsyncEngine) -> dict[str, int]:
    async with engine.connect() as conn:
        return {t: (await conn.execute(text(f"SELECT count(*) FROM {t}"))).scalar_one() for t in _CHILD_TABLES}


async def test_the_state_checks_migration_keeps_the_rows_the_previous_heads_wrote(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        await migrate(engine, "0007")
        written = dt.datetime(2026, 11, 30, 19, 0, tzinfo=dt.UTC)
        async with engine.begin() as conn:
            for statement in _PREVIOUS_HEAD_ROWS.strip().split(";\n"):
                await conn.execute(text(statement), {"t": written})
        before = await _counts(engine)
        assert before == {"sessions": 2, "session_vms": 1, "tasks": 1, "held_checkpoints": 1, "restore_points": 1}
        # Each migration that copies a table on SQLite (0008 jobs and session_vms, 0009 sessions, 0010
        # sessions, session_vms and tasks): no cascade of the old copy's drop may delete a row pointing at it.
        for revision in ("0008", "0009"):
            await migrate(engine, revision)
            assert await _counts(engine) == before, revision
        await migrate(engine)
        assert await _counts(engine) == before
        sessions = async_sessionmaker(engine, expire_on_commit=False)
        async with sessions() as s:
            s1 = await s.get(Session, "s1")
            held = await s.scalar(select(HeldCheckpoint))
            task = await s.get(Task, "k1")
        assert s1 is not None and s1.state is SessionState.INCOMPLETE and s1.notification is Notification.PENDING
        assert s1.ended_at == written and held is not None and held.deadline == written
        assert task is not None and task.state is TaskState.RESUMABLE and task.committed_offset == 4096
        with pytest.raises(IntegrityError):
            async with engine.begin() as conn:
                await conn.execute(text("UPDATE tasks SET state = 'lost'"))
        await downgrade(engine, "0009")  # and back, with the rows
        assert await _counts(engine) == before
        async with engine.begin() as conn:
            await conn.execute(text("UPDATE tasks SET state = 'lost'"))  # unchecked again
    finally:
        await engine.dispose()


async def test_the_replica_points_migration_gives_earlier_rows_their_defaults_and_checks_replica_end(
    db_url: str,
) -> None:
    engine = make_engine(db_url)
    try:
        await migrate(engine, "0007")
        written = dt.datetime(2026, 11, 30, 19, 0, tzinfo=dt.UTC)
        async with engine.begin() as conn:
            for statement in _PREVIOUS_HEAD_ROWS.strip().split(";\n"):
                await conn.execute(text(statement), {"t": written})
        await migrate(engine, "0010")
        before = await _counts(engine)
        await migrate(engine)
        assert await _counts(engine) == before
        sessions = async_sessionmaker(engine, expire_on_commit=False)
        async with sessions() as s:
            point, vm = await s.get(RestorePoint, "p1"), await s.get(SessionVm, "v1")
            held, job = await s.scalar(select(HeldCheckpoint)), await s.get(Job, "j")
        assert point is not None and (point.vm_name, point.size_bytes, point.consistency, point.disks) == (
            "",
            0,
            "",
            [],
        )
        assert vm is not None and (vm.consistency, vm.replica_end) == ("crash", ReplicaEnd.UNTOLD)
        assert held is not None and held.consistency == "crash" and job is not None and job.replica_format == ""
        async with engine.begin() as conn:
            await conn.execute(text("UPDATE session_vms SET replica_end = 'rolled_back'"))
        with pytest.raises(IntegrityError):
            async with engine.begin() as conn:
                await conn.execute(text("UPDATE session_vms SET replica_end = 'maybe'"))
        await downgrade(engine, "0010")  # and back, with the rows
        assert await _counts(engine) == before
    finally:
        await engine.dispose()


_OPERATIONS_ROWS = """
INSERT INTO hosts (id, name, provider, address, created_at, winrm) VALUES ('h', 'h', 'file', '/x', :t, '{}');
INSERT INTO targets (id, name, address, tls_server_name, max_tasks) VALUES ('t', 't', 'a:1', '', 4);
INSERT INTO jobs (id, name, host_id, target_id, replica_root, restore_points_to_keep, compression, block_size,
  bandwidth_limit_mbps, change_tracking, guest_processing, exclusions, schedule, checkpoint_hold_seconds, retries,
  retry_wait_seconds, full_check_every, webhook, enabled, created_at, replica_format)
  VALUES ('j', 'j', 'h', 't', 'r/j', 7, 'default', 1048576, 0, 'auto', '{}', '{}', '{}', 86400, 2, 60, 10, '{}', true,
  :t, '');
INSERT INTO sessions (id, job_id, state, started_at, error, notification, full_check)
  VALUES ('s', 'j', 'succeeded', :t, '', '', false)
"""


async def test_the_operations_migration_reads_earlier_sessions_as_replication_and_checks_states(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        await migrate(engine, "0013")
        async with engine.begin() as conn:
            for statement in _OPERATIONS_ROWS.strip().split(";\n"):
                await conn.execute(text(statement), {"t": dt.datetime(2026, 12, 1, tzinfo=dt.UTC)})
        await migrate(engine)
        sessions = async_sessionmaker(engine, expire_on_commit=False)
        async with sessions() as s:
            session, job = await s.get(Session, "s"), await s.get(Job, "j")
        assert session is not None and (session.kind, session.operation, session.only_vms) == (
            SessionKind.REPLICATION,
            "",
            [],
        )
        assert job is not None and (job.failover_host_id, job.network_mapping, job.failback_target_id) == (
            None,
            [],
            None,
        )
        with pytest.raises(IntegrityError):
            async with engine.begin() as conn:
                await conn.execute(text("UPDATE sessions SET kind = 'backup'"))
        with pytest.raises(IntegrityError):
            async with engine.begin() as conn:
                await conn.execute(
                    text(
                        "INSERT INTO replica_vms (id, job_id, vm_id, vm_name, state, busy_session_id, session_id, "
                        "point_id, mount_id, host_id, running_vm_id, running_vm_name, folder, since) VALUES "
                        "('r', 'j', 'v', 'v', 'lost', '', '', '', '', '', '', '', '', :t)"
                    ),
                    {"t": dt.datetime(2026, 12, 1, tzinfo=dt.UTC)},
                )
        await downgrade(engine, "0013")  # and back, with the rows
        async with engine.begin() as conn:
            assert (await conn.execute(text("SELECT count(*) FROM sessions"))).scalar() == 1
    finally:
        await engine.dispose()
