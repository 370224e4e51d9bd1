"""gRPC plumbing shared by every program: servers, channels and the error mapping.

`handle_errors` is the one place where exceptions become gRPC statuses: a
`VmreplError` maps to its class's status, anything else to INTERNAL with a
generic message (details go to the log, never to the caller). An
INVALID_ARGUMENT also carries a `google.rpc.BadRequest` naming the field in
the status details (the `grpc-status-details-bin` trailer), so a client in any
language can point at the field without parsing the message.

Every service declares its access policy once, as a roles table (`Service.roles`),
enforced here for every method before the request is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2, message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError
from google.rpc.error_details_pb2 import BadRequest
from google.rpc.status_pb2 import Status
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

from vmrepl.config import TlsSettings
from vmrepl.errors import InvalidArgument, VmreplError
from vmrepl.log_limit import peer_of, refused
from vmrepl.logs import get_logger
from vmrepl.memory import ReleaseWhenIdle
from vmrepl.security.tls import channel_credentials, require_role, server_credentials

log = get_logger("vmrepl.rpc")

F = TypeVar("F", bound=Callable[..., Any])


# The program an internal error's message sends the caller to ("see the controller's log"); start_server
# sets it. One program per process, so one name.
_PROGRAM = {"name": "agent"}


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, VmreplError):
        return grpc.StatusCode[exc.grpc_code], str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error; see the {_PROGRAM['name']}'s log"


def status_details(exc: BaseException) -> tuple[tuple[str, bytes], ...]:
    """The trailing metadata that carries a `google.rpc.Status` with the error's details, if it has any:
    a `BadRequest` field violation for an InvalidArgument, nothing for other errors."""
    code, message = status_for(exc)
    if not isinstance(exc, InvalidArgument) or code is not grpc.StatusCode.INVALID_ARGUMENT:
        return ()
    violation = BadRequest.FieldViolation(field=exc.field, description=exc.description)
    detail = any_pb2.Any()
    detail.Pack(BadRequest(field_violations=[violation]))
    status = Status(code=code.value[0], message=message, details=[detail])
    return tuple(rpc_status.to_status(status).trailing_metadata)


async def _abort(context: Any, exc: Exception, method: str) -> None:
    code, message = status_for(exc)
    # Rate-limited and counted (see vmrepl.log_limit): a caller can make these as fast as it likes.
    if isinstance(exc, VmreplError):
        refused(log, "rpc_failed", peer=peer_of(context), method=method, code=code.name, error=message)
    else:
        refused(log, "rpc_internal_error", peer=peer_of(context), method=method, code=code.name, exc_info=True)
    await context.abort(code, message, trailing_metadata=status_details(exc))


def handle_errors(fn: F) -> F:
    """Map exceptions of a servicer method (unary or server-streaming) to gRPC statuses."""
    name = fn.__qualname__
    if inspect.isasyncgenfunction(fn):

        @functools.wraps(fn)
        async def gen_wrapper(self: Any, request: Any, context: Any) -> AsyncIterator[Any]:
            try:
                # Closed here, not left to the garbage collector: when the caller goes away the servicer's own
                # `finally` (a slot given back, a file closed) runs at once.
                async with contextlib.aclosing(fn(self, request, context)) as items:
                    async for item in items:
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

    `roles` is the service's access policy, declared once next to its servicer:
    for every method, the certificate roles that may call it. The caller's role
    is checked before any request message is read (a refused caller cannot make
    the server receive a 16 MiB message first); a table that does not name
    exactly the service's methods is refused when the server starts.

    `in_band_failures` names the streaming methods whose callers expect the
    reason for a failure as a response message before the status (see
    TransferFailure in target.proto): the function makes that message from the
    status code's name and the reason, and a refused call is sent it too.
    """

    descriptor: ServiceDescriptor
    servicer: Any
    roles: Mapping[str, tuple[str, ...]]
    raw_requests: frozenset[str] = frozenset()
    in_band_failures: Mapping[str, Callable[[str, str], Any]] = field(default_factory=dict)


# By whether the method streams its responses; every request side is a stream, see _guard.
_HANDLER_KINDS = {False: grpc.stream_unary_rpc_method_handler, True: grpc.stream_stream_rpc_method_handler}


async def _admit(context: Any, roles: tuple[str, ...], method: str, failure: Callable[[str, str], Any] | None) -> None:
    """Abort the call unless the caller's certificate carries one of `roles`."""
    try:
        require_role(context, *roles)
    except VmreplError as e:
        if failure is not None:
            code, message = status_for(e)
            with contextlib.suppress(Exception):  # the caller may be gone already
                await context.write(failure(code.name, message))
        await _abort(context, e, method)


async def _single(requests: AsyncIterator[bytes], parse: Callable[[bytes], Any] | None) -> Any:
    """The one request message of a call declared unary, read only after the caller was admitted."""
    raw = await anext(requests, None)
    if raw is None:
        raise InvalidArgument("request", "the call ended before its request message")
    if parse is None:  # a raw-bytes method: the servicer parses it
        return raw
    try:
        return parse(raw)
    except DecodeError as e:
        raise InvalidArgument("request", f"does not parse: {e}") from e


def _guard(
    behaviour: Callable[..., Any],
    m: MethodDescriptor,
    *,
    roles: tuple[str, ...],
    parse: Any,
    calls: ReleaseWhenIdle | None,
    failure: Callable[[str, str], Any] | None,
) -> Any:
    """Wrap a method's behaviour so the role check runs before the request is read.

    gRPC reads a unary request before it calls the behaviour, so methods declared
    unary are registered as client-streaming (the same bytes on the wire) and
    their single message is read and parsed here, after the check. Every call,
    refused or not, is counted in `calls`.
    """
    name = f"{m.containing_service.name}.{m.name}"
    counted = calls.counting if calls is not None else contextlib.nullcontext

    async def request(requests: Any, context: Any) -> Any:
        await _admit(context, roles, name, failure)
        if m.client_streaming:
            return requests
        try:
            return await _single(requests, parse)
        except VmreplError as e:
            await _abort(context, e, name)

    if inspect.isasyncgenfunction(behaviour):

        async def streaming(requests: Any, context: Any) -> AsyncIterator[Any]:
            with counted():
                async for item in behaviour(await request(requests, context), context):
                    yield item

        return streaming

    async def single(requests: Any, context: Any) -> Any:
        with counted():
            return await behaviour(await request(requests, context), context)

    return single


def _add_service(server: grpc.aio.Server, svc: Service, calls: ReleaseWhenIdle | None) -> None:
    methods = list(svc.descriptor.methods)
    if set(svc.roles) != {m.name for m in methods} or not all(svc.roles.values()):
        raise ValueError(
            f"{svc.descriptor.full_name}: the roles table must name exactly the service's methods, each with a role"
        )
    handlers = {}
    for m in methods:
        request_cls = message_factory.GetMessageClass(m.input_type)
        response_cls = message_factory.GetMessageClass(m.output_type)
        behaviour = getattr(svc.servicer, m.name)
        parse = None if m.name in svc.raw_requests else request_cls.FromString
        failure = svc.in_band_failures.get(m.name)
        behaviour = _guard(behaviour, m, roles=svc.roles[m.name], parse=parse, calls=calls, failure=failure)
        # Registered as client-streaming whatever the declaration: _guard reads the request after the check.
        make = _HANDLER_KINDS[m.server_streaming]
        handlers[m.name] = make(
            behaviour, request_deserializer=None, response_serializer=response_cls.SerializeToString
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
    release_memory_when_idle: bool = False,
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """Start an mTLS server with the given services, health and reflection; returns the bound port.

    `program` ("controller", "proxy", "target") is named by internal errors' messages. With
    `release_memory_when_idle`, free heap memory is given back to the OS once no call of the services
    is in progress (see vmrepl.memory): a burst of large messages, even refused ones, leaves
    glibc holding the buffers otherwise.
    """
    _PROGRAM["name"] = program
    server = grpc.aio.server(
        options=message_options(max_message_bytes) + _KEEPALIVE_SERVER, interceptors=list(interceptors)
    )
    calls = ReleaseWhenIdle() if release_memory_when_idle else None
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
    for svc in services:
        _add_service(server, svc, calls)
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
