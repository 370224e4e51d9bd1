"""structlog, configured once per process.

Services log JSON lines; people at a terminal get the console renderer.
Stdlib loggers (grpc, pywinrm, asyncio) are routed through the same
processors so every line has one shape. Per-transfer ids are bound with
`structlog.contextvars.bound_contextvars`, so they follow tasks and threads
started with `asyncio.to_thread`.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal, TextIO

import structlog

LogFormat = Literal["json", "console"]

_SHARED: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
    structlog.processors.StackInfoRenderer(),
]


def configure_logging(*, fmt: LogFormat = "json", level: str = "info", stream: TextIO | None = None) -> None:
    """Configure structlog and the stdlib root logger. Call once, at program start."""
    numeric = logging.getLevelNamesMapping().get(level.upper())
    if numeric is None:
        raise ValueError(f"unknown log level {level!r}")
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=(stream or sys.stderr).isatty())
    )
    structlog.configure(
        processors=[
            # Drop events below the level first, so per-batch debug lines cost nothing at info.
            structlog.stdlib.filter_by_level,
            *_SHARED,
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=_SHARED,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # grpc's C core logs through absl, not here; its Python side is chatty at debug.
    logging.getLogger("grpc").setLevel(max(numeric, logging.INFO))
    # httpx logs every request's full URL at info; a webhook's URL carries its token.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))
    # aiosqlite logs every statement with its parameters at debug. (SQLAlchemy's own engine logger stays at
    # its WARNING default, and the controller's engine hides parameters in any case.)
    logging.getLogger("aiosqlite").setLevel(max(numeric, logging.INFO))


def json_formatter() -> logging.Formatter:
    """Renders a record as the JSON line the daemons write (for extra handlers, e.g. per-session logs)."""
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_SHARED,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, structlog.processors.JSONRenderer()],
    )


def event_of(record: logging.LogRecord) -> dict[str, Any]:
    """The structlog event dict a record carries ({} for a plain stdlib record)."""
    return record.msg if isinstance(record.msg, dict) else {}


def get_logger(name: str) -> Any:
    return structlog.stdlib.get_logger(name)
