"""The configuration database on a real SQLite file: migrations, models, secrets at rest."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from cryptography.fernet import Fernet
from sqlalchemy import JSON, DateTime, Integer, column, insert, inspect, select, table, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from controller.api import paging
from controller.api.base import BY_NAME, RESTORE_POINTS, SESSIONS
from controller.db.connect import downgrade, make_engine, migrate, open_database, sqlite_url
from controller.db.models import Base, Credential, Host, Job, JobVm, RestorePoint, Session, Target
from controller.db.secrets import SecretBox, create_key_file
from tests.support.database import BACKENDS
from vmrepl.errors import ConfigError, SecurityError


@pytest.fixture(params=BACKENDS)
async def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return sqlite_url(tmp_path / "c.db")
    url = os.environ["VMREPL_TEST_DATABASE_URL"]
    engine = make_engine(url)
    async with engine.begin() as conn:  # a fresh, empty schema for every test
        await conn.execute(text("DROP SCHEMA public CASCADE"))
        await conn.execute(text("CREATE SCHEMA public"))
    await engine.dispose()
    return url


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
            if isinstance(c.type, DateTime):
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
