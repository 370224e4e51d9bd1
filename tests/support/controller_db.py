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


def _template() -> Path:
    if not _TEMPLATE:
        folder = Path(tempfile.mkdtemp(prefix="vmrepl-migrated-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        path = folder / "controller.db"
        asyncio.run(_migrate(path))
        _TEMPLATE.append(path)
    return _TEMPLATE[0]


def seed_controller_database(data_dir: Path) -> None:
    """Put a migrated, empty controller database (SQLite) in `data_dir`, where the controller looks for it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    db_path = data_dir / "controller.db"
    shutil.copyfile(_template(), db_path)
    with sqlite3.connect(db_path) as db:
        db.execute("UPDATE installation SET id = ?", (secrets.token_hex(4),))  # as migration 0013 makes it
    db.close()
