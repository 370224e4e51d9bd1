"""Opening the database and bringing its schema to the current migration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from controller.db.secrets import SecretBox

MIGRATIONS = Path(__file__).with_name("migrations")


def sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # WAL for concurrent readers, FULL so a committed state change survives power loss, and
    # foreign keys, which SQLite leaves off unless asked.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def make_engine(url: str, *, connections: int | None = None) -> AsyncEngine:
    """An engine with its own connection pool: `connections` at most when given (no overflow), else
    SQLAlchemy's default pool."""
    sizing: dict[str, Any] = {} if connections is None else {"pool_size": connections, "max_overflow": 0}
    # hide_parameters: no log line or error message of SQLAlchemy's carries a statement's values (a
    # sealed secret today, whatever a column holds tomorrow).
    engine = create_async_engine(url, pool_pre_ping=True, hide_parameters=True, **sizing)
    if engine.dialect.name == "sqlite":
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    return engine


def alembic_config(connection: Connection | None = None, secrets: SecretBox | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    cfg.attributes["secrets"] = secrets  # for migrations that seal values kept in clear before
    return cfg


async def migrate(engine: AsyncEngine, revision: str = "head", *, secrets: SecretBox | None = None) -> None:
    """Apply every pending migration (run at controller start)."""
    async with engine.begin() as conn:
        await conn.run_sync(lambda sync_conn: command.upgrade(alembic_config(sync_conn, secrets), revision))


async def downgrade(engine: AsyncEngine, revision: str, *, secrets: SecretBox | None = None) -> None:
    """Go back to an earlier migration (tests of the migrations; an operator's downgrade)."""
    async with engine.begin() as conn:
        await conn.run_sync(lambda sync_conn: command.downgrade(alembic_config(sync_conn, secrets), revision))


async def open_database(url: str, *, secrets: SecretBox | None = None) -> tuple[AsyncEngine, async_sessionmaker[Any]]:
    engine = make_engine(url)
    await migrate(engine, secrets=secrets)
    return engine, async_sessionmaker(engine, expire_on_commit=False)
