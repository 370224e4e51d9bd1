"""The configuration database on a real SQLite file: migrations, models, secrets at rest."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from cryptography.fernet import Fernet
from sqlalchemy import inspect, select, text
from sqlalchemy.exc import IntegrityError

from controller.db.engine import make_engine, open_database, sqlite_url
from controller.db.models import Base, Credential, Host, Job, JobVm, Target
from controller.db.secrets import SecretBox, create_key_file
from vmrepl.errors import ConfigError, SecurityError

# PostgreSQL joins when a URL is given (the scheduling issue runs it in CI); SQLite always runs.
BACKENDS = ["sqlite"] + (["postgresql"] if os.environ.get("VMREPL_TEST_DATABASE_URL") else [])


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
