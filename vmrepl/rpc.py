"""gRPC plumbing shared by every program: servers, channels and the error mapping.

`handle_errors` is the one place where exceptions become gRPC statuses: a
`VmreplError` maps to its class's status, anything else to INTERNAL with a
generic message (details go to the log, never to the caller).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from vmrepl.config import TlsSettings
from vmrepl.errors import VmreplError
from vmrepl.logs import get_logger
from vmrepl.security.tls import channel_credentials, server_credentials

log = get_logger("vmrepl.rpc")

F = TypeVar("F", bound=Callable[..., Any])


# The program an internal error's message sends the caller to ("see the controller's log"); start_server
# sets it. One program per process, so one name.
_PROGRAM = {"name": "agent"}


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, VmreplError):
        return grpc.StatusCode[exc.grpc_code], str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error; see the {_PROGRAM['name']}'s log"


async def _abort(context: Any, exc: Exception, method: str) -> None:
    code, message = status_for(exc)
    if isinstance(exc, VmreplError):
        log.warning("rpc_failed", method=method, code=code.name, error=message)
    else:
        log.exception("rpc_internal_error", method=method)
    await context.abort(code, message)


def handle_errors(fn: F) -> F:
    """Map exceptions of a servicer method (unary or server-streaming) to gRPC statuses."""
    name = fn.__qualname__
    if inspect.isasyncgenfunction(fn):

        @functools.wraps(fn)
        async def gen_wrapper(self: Any, request: Any, context: Any) -> AsyncIterator[Any]:
            try:
                async for item in fn(self, request, context):
                    yield item
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as e:
                await _abort(context, e, name)

        return gen_wrapper  # type: ignore[return-value]

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: Any) -> Any:
        try:
            return await fn(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as e:
            await _abort(context, e, name)

    return wrapper  # type: ignore[return-value]


def message_options(max_bytes: int) -> list[tuple[str, Any]]:
    """gRPC's default receive limit is 4 MiB; raise both limits to exactly what we need."""
    return [
        ("grpc.max_receive_message_length", max_bytes),
        ("grpc.max_send_message_length", max_bytes),
    ]


# Detect a peer that vanished (no RST) within ~20 s, and reconnect quickly after a restart.
_KEEPALIVE_CLIENT = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 3_000),
]
_KEEPALIVE_SERVER = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
]


def secure_channel(
    address: str, tls: TlsSettings, *, max_message_bytes: int = 4 << 20, server_name: str = ""
) -> grpc.aio.Channel:
    options = message_options(max_message_bytes) + _KEEPALIVE_CLIENT
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.aio.secure_channel(address, channel_credentials(tls), options=options)


@dataclass(frozen=True)
class Service:
    """A servicer and its protobuf service descriptor.

    Methods named in `raw_requests` get their request as the raw bytes of the
    message (the servicer parses it, see vmrepl.batch); all others are parsed
    by protobuf as usual.
    """

    descriptor: ServiceDescriptor
    servicer: Any
    raw_requests: frozenset[str] = frozenset()


_HANDLER_KINDS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def _add_service(server: grpc.aio.Server, svc: Service) -> None:
    handlers = {}
    for m in svc.descriptor.methods:
        request_cls = message_factory.GetMessageClass(m.input_type)
        response_cls = message_factory.GetMessageClass(m.output_type)
        make = _HANDLER_KINDS[(m.client_streaming, m.server_streaming)]
        handlers[m.name] = make(
            getattr(svc.servicer, m.name),
            request_deserializer=None if m.name in svc.raw_requests else request_cls.FromString,
            response_serializer=response_cls.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(svc.descriptor.full_name, handlers),))


async def start_server(
    *,
    listen: str,
    tls: TlsSettings,
    services: Sequence[Service],
    max_message_bytes: int,
    program: str,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """Start an mTLS server with the given services, health and reflection; returns the bound port.
    `program` ("controller", "proxy", "target") is named by internal errors' messages."""
    _PROGRAM["name"] = program
    server = grpc.aio.server(
        options=message_options(max_message_bytes) + _KEEPALIVE_SERVER, interceptors=list(interceptors)
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
    for svc in services:
        _add_service(server, svc)
        names.append(svc.descriptor.full_name)
    reflection.enable_server_reflection(names, server)
    port = server.add_secure_port(listen, server_credentials(tls))
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    await server.start()
    for svc in services:
        await health_servicer.set(svc.descriptor.full_name, health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, port, health_servicer


async def serve_until_signalled(server: grpc.aio.Server, on_stop: Callable[[], Awaitable[None]] | None = None) -> None:
    """Run until SIGTERM/SIGINT, then stop gracefully (in-flight calls get a few seconds)."""
    import signal

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except NotImplementedError:  # Windows: the service wrapper stops the process
            signal.signal(sig, lambda *_: loop.call_soon_threadsafe(stop.set))
    await stop.wait()
    log.info("stopping")
    if on_stop is not None:
        await on_stop()
    await server.stop(grace=5)
