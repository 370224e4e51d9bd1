"""A controller database migrated once per test process, copied into each test's controller data folder.

Running every migration on an empty SQLite database takes about 1.4 s of a controller's first start, and
the integration suite starts about 200 controllers. A copy of one migrated database is the same schema
(the migrations made it); each copy gets an installation id of its own, as a new installation would. The
migrations themselves are tested in tests/unit/test_db.py, and `make demo` starts on an empty database."""

from __future__ import annotations

import asyncio
import atexit
import secrets
import shutil
import sqlite3
import tempfile
from pathlib import Path

from controller.db.connect import open_database, sqlite_url

_TEMPLATE: list[Path] = []  # the migrated database of this process, once made


async def _migrate(path: Path) -> None:
    engine, _ = await open_database(sqlite_url(path))
    await engine.dispose()  # the last connection's close checkpoints the WAL into the file


def _new_template_path() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="vmrepl-migrated-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder / "controller.db"


def _template() -> Path:
    if not _TEMPLATE:
        path = _new_template_path()
        asyncio.run(_migrate(path))
        _TEMPLATE.append(path)
    return _TEMPLATE[0]


def _copy(template: Path, db_path: Path) -> None:
    db_path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, db_path)
    with sqlite3.connect(db_path) as db:
        db.execute("UPDATE installation SET id = ?", (secrets.token_hex(4),))  # as migration 0013 makes it
    db.close()


async def seeded_sqlite_url(db_path: Path) -> str:
    """The URL of a migrated, empty controller database at `db_path` (for tests running in an event loop,
    which open it with open_database: at the head already, that only checks)."""
    if not _TEMPLATE:
        path = _new_template_path()
        await _migrate(path)
        _TEMPLATE.append(path)
    _copy(_TEMPLATE[0], db_path)
    return sqlite_url(db_path)


def seed_controller_database(data_dir: Path) -> None:
    """Put a migrated, empty controller database (SQLite) in `data_dir`, where the controller looks for it."""
    _copy(_template(), data_dir / "controller.db")
