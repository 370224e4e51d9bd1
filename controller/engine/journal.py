"""Where every state change of the session engine is written, committed, before the engine acts on it.

The engine never keeps a decision only in memory: it writes the new state,
commits, then calls the agent or the provider. After a crash it reads the
states back and continues (see controller/engine/session.py). Writes are serialised
(one controller process owns the database), which also keeps SQLite from
returning "database is locked" under concurrent tasks.

`crash_at` is a test hook: the process exits right after the Nth committed
change, which is how the tests kill the controller at every transition.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from vmrepl.errors import FailedPrecondition
from vmrepl.logs import get_logger

log = get_logger("vmrepl.controller.engine.journal")
CRASH_EXIT_CODE = 70
M = TypeVar("M")


class Journal:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], *, crash_at: int = 0) -> None:
        self._sessions = sessions
        self._lock = asyncio.Lock()
        self._crash_at = crash_at
        self.changes = 0

    @asynccontextmanager
    async def change(self, what: str, **ids: Any) -> AsyncIterator[AsyncSession]:
        """A transaction holding one state change; committed when the block ends without error."""
        async with self._lock:
            async with self._sessions() as db, db.begin():
                yield db
            self.changes += 1
            log.debug("state_changed", n=self.changes, change=what, **ids)
            if self._crash_at and self.changes == self._crash_at:
                log.warning("crash_hook_exit", n=self.changes, change=what, **ids)
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(CRASH_EXIT_CODE)

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncSession]:
        """A transaction changing configuration (not a session's state): serialised, not counted."""
        async with self._lock, self._sessions() as db, db.begin():
            yield db

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        """A session for reads (and for progress figures, which are not state changes)."""
        async with self._sessions() as db:
            yield db

    async def load(self, model: type[M], key: str) -> M:
        """A row by primary key, read outside any transaction; FailedPrecondition if it is gone."""
        async with self._sessions() as db:
            row = await db.get(model, key)
        if row is None:
            raise FailedPrecondition(f"{model.__tablename__} row {key} vanished from the database")  # type: ignore[attr-defined]
        return row

    async def note(self, obj: type[Any], key: str, **values: Any) -> None:
        """Update figures that are not a state (progress counters): no hook, no ordering guarantee needed."""
        async with self._lock, self._sessions() as db, db.begin():
            row = await db.get(obj, key)
            if row is not None:
                for k, v in values.items():
                    setattr(row, k, v)
