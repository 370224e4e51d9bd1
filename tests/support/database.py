"""The database backends the controller's tests run on."""

from __future__ import annotations

import asyncio
import os
import uuid

from sqlalchemy.engine import make_url

# SQLite always; PostgreSQL too when a URL is given (CI gives one).
BACKENDS = ["sqlite"] + (["postgresql"] if os.environ.get("VMREPL_TEST_DATABASE_URL") else [])


async def _pg(base_url: str, sql: str) -> None:
    import asyncpg

    url = make_url(base_url).set(drivername="postgresql")
    conn = await asyncpg.connect(url.render_as_string(hide_password=False))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def new_pg_database(base_url: str) -> tuple[str, str]:
    """A new, empty PostgreSQL database next to the one in `base_url`: (its URL, its name). Each test gets
    its own, so tests on PostgreSQL can run in parallel."""
    name = f"vmrepl_t_{uuid.uuid4().hex[:12]}"
    await _pg(base_url, f'CREATE DATABASE "{name}"')
    return make_url(base_url).set(database=name).render_as_string(hide_password=False), name


async def remove_pg_database(base_url: str, name: str) -> None:
    await _pg(base_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def create_pg_database(base_url: str) -> tuple[str, str]:
    return asyncio.run(new_pg_database(base_url))


def drop_pg_database(base_url: str, name: str) -> None:
    asyncio.run(remove_pg_database(base_url, name))
