"""Opening the database and bringing its schema to the current migration."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import event, select
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from controller.db.models import Installation
from controller.db.secrets import SecretBox
from vmrepl.errors import ConfigError

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
    await _run_alembic(engine, lambda cfg: command.upgrade(cfg, revision), secrets)


async def downgrade(engine: AsyncEngine, revision: str, *, secrets: SecretBox | None = None) -> None:
    """Go back to an earlier migration (tests of the migrations; an operator's downgrade)."""
    await _run_alembic(engine, lambda cfg: command.downgrade(cfg, revision), secrets)


async def _run_alembic(engine: AsyncEngine, run: Callable[[Config], None], secrets: SecretBox | None) -> None:
    """One Alembic command in one transaction. On SQLite with foreign keys off meanwhile: Alembic alters a
    table there by copying it and dropping the old one, and that drop would delete the rows of every table
    whose foreign key cascades. The keys are checked before the commit instead, and on again after it."""
    async with engine.connect() as conn:
        sqlite = conn.dialect.name == "sqlite"
        if sqlite:
            await conn.exec_driver_sql("PRAGMA foreign_keys=OFF")  # ignored inside a transaction: before it
            await conn.commit()
        try:
            async with conn.begin():
                await conn.run_sync(lambda sync_conn: run(alembic_config(sync_conn, secrets)))
                if sqlite and (await conn.exec_driver_sql("PRAGMA foreign_key_check")).first() is not None:
                    raise ConfigError("the database has rows whose foreign keys point nowhere: migration rolled back")
        finally:
            if sqlite:
                await conn.exec_driver_sql("PRAGMA foreign_keys=ON")
                await conn.commit()


async def open_database(url: str, *, secrets: SecretBox | None = None) -> tuple[AsyncEngine, async_sessionmaker[Any]]:
    engine = make_engine(url)
    await migrate(engine, secrets=secrets)
    return engine, async_sessionmaker(engine, expire_on_commit=False)


async def installation_id(sessions: async_sessionmaker[Any]) -> str:
    """This installation's id (models.Installation), made by the migration that created its table."""
    async with sessions() as db:
        row: Installation | None = await db.scalar(select(Installation).limit(1))
    if row is None:
        raise ConfigError("the database holds no installation id (table installation is empty): restore it")
    return row.id
