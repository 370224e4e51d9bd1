"""Each session's log: the controller's log lines bound to that session, kept in a file per session.

A logging handler next to the main one copies every line carrying a `session_id` (JSON, the same
shape) to `data_dir/sessions/<id>.log`; GetSessionLog reads it back. Lines carry ids, states, figures
and errors; secrets are never logged in the first place.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from pathlib import Path
from typing import Any

from vmrepl.logs import event_of, json_formatter

_SESSION_ID = re.compile(r"^[0-9a-f]{32}$")


class SessionLogHandler(logging.Handler):
    def __init__(self, directory: Path) -> None:
        super().__init__()
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.setFormatter(json_formatter())

    def emit(self, record: logging.LogRecord) -> None:
        session_id = str(event_of(record).get("session_id", ""))
        if not _SESSION_ID.fullmatch(session_id):  # only controller-made ids: never a path from outside
            return
        try:
            line = self.format(record)
            with self._lock, open(self.directory / f"{session_id}.log", "a", encoding="utf-8") as f:
                f.write(line + "\n")
        except Exception:
            self.handleError(record)


def read_session_log(directory: Path, session_id: str, *, offset: int, limit: int) -> tuple[list[dict[str, Any]], bool]:
    """Lines [offset, offset+limit) of a session's log, and whether more follow."""
    if not _SESSION_ID.fullmatch(session_id):
        return [], False
    try:
        with open(directory / f"{session_id}.log", encoding="utf-8") as f:
            lines = f.readlines()
    except FileNotFoundError:
        return [], False
    out = []
    for line in lines[offset : offset + limit]:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a crash
    return out, len(lines) > offset + limit
