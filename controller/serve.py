"""`vmrepl-controller`: the controller daemon (foreground; systemd runs it, SIGTERM stops it cleanly).

Started through `controller.entry.daemon` (the entry point, or `python -m controller`), which checks the
controller extra is installed before this module imports it."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from sqlalchemy.ext.asyncio import async_sessionmaker

from controller.api.service import ControllerServicer, controller_service
from controller.config import ControllerSettings
from controller.db.connect import installation_id, make_engine, open_database
from controller.db.secrets import SecretBox, create_key_file
from controller.engine.agents import READY_WITHIN_SECONDS, AgentPool
from controller.engine.journal import Journal
from controller.engine.providers import Providers
from controller.engine.reverse import FailbackTransfers
from controller.engine.runtime import EngineParts
from controller.engine.sessions import Engine
from controller.engine.slots import SlotBoard
from controller.observability import metrics
from controller.observability.session_log import SessionLogHandler
from controller.observability.webhooks import Notifier
from controller.scheduling.scheduler import Scheduler, utc_now
from vmrepl.call_limits import CallLimits
from vmrepl.daemon import run_daemon, serve_services
from vmrepl.logs import get_logger
from vmrepl.metrics import serve_metrics
from vmrepl.security.ticket import load_signing_key
from vmrepl.supervise import every, stop_all

log = get_logger("vmrepl.controller")


# How often test failovers' deadlines are looked at.
TEST_DEADLINE_SECONDS = 10.0


def secret_box(settings: ControllerSettings) -> SecretBox:
    """The keys of secrets at rest; a first start makes the key file."""
    key_file = settings.key_file()
    if not key_file.exists():
        create_key_file(key_file)
        log.info("secret_key_created", path=str(key_file))
    return SecretBox.from_file(key_file)


class Stoppable(Protocol):
    async def shutdown(self, grace: float) -> None: ...


async def shut_down(
    background: Sequence[asyncio.Task[Any]],
    engine: Stoppable,
    *,
    grace: float,
    then: Sequence[Callable[[], Awaitable[None]]],
) -> None:
    """The daemon's stop: the background loops first (no new session may start while the running ones
    stop), then the engine's sessions, then the closers in order. A background task that died or kept
    failing is logged by stop_all, never raised here: the engine still shuts down."""
    await stop_all(background)
    await engine.shutdown(grace)
    for close in then:
        await close()


def _background(
    journal: Journal, engine: Engine, notifier: Notifier, clock: Callable[[], dt.datetime]
) -> list[asyncio.Task[Any]]:
    """Each supervised (vmrepl.supervise): a failure is logged and retried, never the end of the loop."""
    return [
        asyncio.create_task(Scheduler(journal=journal, engine=engine, clock=clock).run(), name="scheduler"),
        asyncio.create_task(metrics.keep_fresh(journal), name="metrics"),
        asyncio.create_task(notifier.run(), name="webhooks"),
        # Test failovers past their deadline are stopped (a STOP_TEST session each).
        asyncio.create_task(
            every(TEST_DEADLINE_SECONDS, engine.operations.expire_tests, name="test_failover_deadlines"),
            name="test_failover_deadlines",
        ),
    ]


async def serve(settings: ControllerSettings) -> None:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    secrets = secret_box(settings)
    engine_db, sessions = await open_database(settings.db_url(), secrets=secrets)
    # API reads get a pool of their own, so a flood of them never makes the engine wait for a connection.
    api_db = make_engine(settings.db_url(), connections=settings.api_database_connections)
    journal = Journal(sessions, crash_at=settings.test_crash_at_transition)
    agents = AgentPool(settings.tls)
    parts = EngineParts(
        journal=journal,
        agents=agents,
        # A proxy not answering is waited for as long as a lost one is, and no longer than the target.
        slots=SlotBoard(no_proxy_grace=min(settings.proxy_lost_seconds, READY_WITHIN_SECONDS)),
        signing_key=load_signing_key(settings.signing_key),
        proxy_lost_after=settings.proxy_lost_seconds,
        providers=Providers(secrets, installation=await installation_id(sessions)),
    )
    engine = Engine(parts, reverse=FailbackTransfers(parts))  # failback's transfer (engine/reverse.py)
    await engine.recover()  # sessions a previous run left: continued before anything new starts
    session_logs = settings.data_dir / "sessions"
    logging.getLogger().addHandler(SessionLogHandler(session_logs))
    servicer = ControllerServicer(
        journal=journal,
        reads=async_sessionmaker(api_db, expire_on_commit=False),
        engine=engine,
        secrets=secrets,
        live=parts.live,
        session_logs=session_logs,
    )

    serve_metrics(settings.metrics_listen, settings.tls, plain_http=settings.metrics_plain_http)
    offset = dt.timedelta(seconds=settings.test_clock_offset_seconds)
    clock = (lambda: utc_now() + offset) if offset else utc_now
    engine.operations.clock = clock
    engine.operations.shutdown_seconds = settings.shutdown_vm_seconds
    notifier = Notifier(
        journal=journal, secrets=secrets, render=servicer.session, backoff_seconds=settings.webhook_backoff_seconds
    )
    background = _background(journal, engine, notifier, clock)

    async def stop() -> None:
        closers = (agents.close, api_db.dispose, engine_db.dispose)
        await shut_down(background, engine, grace=settings.stop_timeout_seconds, then=closers)

    await serve_services(
        listen=settings.listen,
        tls=settings.tls,
        services=[controller_service(servicer)],
        max_message_bytes=4 << 20,
        on_stop=stop,
        agent="controller",
        interceptors=[CallLimits(settings.api_limits())],
        database=engine_db.dialect.name,
    )


def main(argv: list[str] | None = None) -> None:
    run_daemon(
        prog="vmrepl-controller",
        description="vmrepl controller daemon",
        settings_cls=ControllerSettings,
        serve=serve,
        argv=argv,
    )
