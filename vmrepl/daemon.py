"""The common start of every vmrepl daemon: parse --config, validate settings, log, serve."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc

from vmrepl.config import LogSettings, ProgramSettings, TlsSettings, load_settings
from vmrepl.errors import ConfigError
from vmrepl.logs import configure_logging, get_logger
from vmrepl.rpc import Service, serve_until_signalled, start_server

S = TypeVar("S", bound=ProgramSettings)


def run_daemon(
    *,
    prog: str,
    description: str,
    settings_cls: type[S],
    serve: Callable[[S], Coroutine[Any, Any, None]],
    argv: list[str] | None = None,
) -> None:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", type=Path, help="TOML settings file (examples in deploy/config/)")
    args = p.parse_args(argv)
    try:
        settings = load_settings(settings_cls, args.config)
    except ConfigError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        raise SystemExit(2) from e
    log_settings: LogSettings = getattr(settings, "log", LogSettings())
    configure_logging(fmt=log_settings.format, level=log_settings.level)
    try:
        asyncio.run(serve(settings))
    except (ConfigError, OSError) as e:
        get_logger(prog).error("start_failed", error=str(e))
        raise SystemExit(1) from e


async def serve_services(
    *,
    listen: str,
    tls: TlsSettings,
    services: Sequence[Service],
    max_message_bytes: int,
    agent: str,
    on_stop: Callable[[], Awaitable[None]] | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    release_memory_when_idle: bool = False,
    **log_fields: object,
) -> None:
    """Start the server, log `listening` (tools read the port from it), run until signalled.
    `agent` is the program's name ("controller", "proxy", "target"), which internal errors name."""
    server, port, _ = await start_server(
        listen=listen,
        tls=tls,
        services=services,
        max_message_bytes=max_message_bytes,
        program=agent,
        interceptors=interceptors,
        release_memory_when_idle=release_memory_when_idle,
    )
    get_logger("vmrepl.daemon").info("listening", address=listen, port=port, agent=agent, **log_fields)
    await serve_until_signalled(server, on_stop)
