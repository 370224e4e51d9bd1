"""A job's schedule naming the job it follows: checked against the database when the API stores it."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import select

from controller.api.resources import jobs as jobs_res
from controller.db.connect import open_database
from controller.db.models import Host, Job, Target
from controller.db.secrets import SecretBox
from tests.support.controller_db import seeded_sqlite_url
from vmrepl.errors import InvalidArgument, NotFound
from vmrepl.v1 import controller_pb2 as api

BOX = SecretBox([Fernet.generate_key()])


def _after(name: str) -> api.Job:
    return api.Job(schedule=api.Schedule(kind=api.SCHEDULE_KIND_AFTER_JOB, after_job=name))


async def test_a_job_following_itself_directly_or_through_others_is_refused_naming_the_chain(tmp_path: Path) -> None:
    """Found by trying: a job created to follow itself was refused as NOT_FOUND (it did not exist yet), and
    a -> b -> a was stored; neither job would ever run, and nothing said so."""
    engine, sessions = await open_database(await seeded_sqlite_url(tmp_path / "c.db"))
    try:
        async with sessions() as db, db.begin():
            host, target = Host(name="h", provider="file", address="/x"), Target(name="t", address="t:1")
            db.add_all([host, target])
            await db.flush()
            for name in ("a", "b", "c"):
                db.add(Job(name=name, host_id=host.id, target_id=target.id, replica_root=name))
        async with sessions() as db, db.begin():
            rows = {j.name: j for j in (await db.scalars(select(Job))).all()}
            await jobs_res.apply_job(db, _after("jobs/a"), rows["b"], ["schedule"], secrets=BOX)
            await jobs_res.apply_job(db, _after("jobs/b"), rows["c"], ["schedule"], secrets=BOX)  # a <- b <- c
        async with sessions() as db:
            rows = {j.name: j for j in (await db.scalars(select(Job))).all()}
            with pytest.raises(
                InvalidArgument, match=r"^job\.schedule\.after_job: .*jobs/a -> jobs/c -> jobs/b -> jobs/a"
            ):
                await jobs_res.apply_job(db, _after("jobs/c"), rows["a"], ["schedule"], secrets=BOX)
            with pytest.raises(InvalidArgument, match=r"^job\.schedule\.after_job: a job cannot follow itself"):
                await jobs_res.apply_job(db, _after("jobs/a"), rows["a"], ["schedule"], secrets=BOX)
            new = Job(name="d", host_id=rows["a"].host_id, target_id=rows["a"].target_id, replica_root="d")
            with pytest.raises(InvalidArgument, match=r"a job cannot follow itself \(jobs/d -> jobs/d\)"):
                await jobs_res.apply_job(db, _after("jobs/d"), new, ["schedule"], secrets=BOX)
            with pytest.raises(NotFound, match=r"^job\.schedule\.after_job: jobs/nope does not exist"):
                await jobs_res.apply_job(db, _after("jobs/nope"), new, ["schedule"], secrets=BOX)
            await jobs_res.apply_job(db, _after("jobs/c"), new, ["schedule"], secrets=BOX)  # a chain, no cycle
            assert new.schedule == {"kind": "after", "after_job": "jobs/c"}
    finally:
        await engine.dispose()
