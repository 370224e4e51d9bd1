"""Bounds on the calls a server runs at once, per client certificate and in total.

`Slots` is the one counter (the target's Transfer streams use it directly); `CallLimits` is the server
interceptor that applies it to every call of a server.

A call past either bound is refused at once with RESOURCE_EXHAUSTED, a message saying when to try again
and the same hint as trailing metadata (`retry-after-ms`), before any of the service's own work: one
client cannot take the server (and what it shares with its own background work) from the others. A
stream holds its place until it ends. Health and reflection calls are not counted, so a server under
load still answers whether it is alive.
"""

from __future__ import annotations

import contextlib
import inspect
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from vmrepl.errors import ResourceExhausted
from vmrepl.log_limit import peer_of, refused
from vmrepl.logs import get_logger

log = get_logger("vmrepl.call_limits")
RETRY_AFTER_KEY = "retry-after-ms"
UNCOUNTED_PREFIXES = ("/grpc.health.", "/grpc.reflection.")


@dataclass(frozen=True, kw_only=True)
class Limits:
    per_client: int
    total: int
    retry_after_seconds: float = 1.0


class Slots:
    """At most `per_peer` holders per peer and `total` in all. Not thread-safe: use from the event loop."""

    def __init__(self, *, per_peer: int, total: int, what: str) -> None:
        if per_peer < 1 or total < 1:
            raise ValueError("slot limits must be at least 1")
        self.per_peer = per_peer
        self.total = total
        self.what = what
        self._held: Counter[str] = Counter()
        self.in_use = 0

    def take(self, peer: str) -> None:
        """Hold a slot for `peer`, or raise ResourceExhausted naming the bound it would pass."""
        if self._held[peer] >= self.per_peer:
            raise ResourceExhausted(f"{peer!r} already has {self.per_peer} {self.what} open (the limit per peer)")
        if self.in_use >= self.total:
            raise ResourceExhausted(f"{self.total} {self.what} are open (the limit)")
        self._held[peer] += 1
        self.in_use += 1

    def give(self, peer: str) -> bool:
        """Give back a slot `peer` holds; True when that was the last slot held by anyone."""
        if self._held[peer] <= 0:
            raise ValueError(f"{peer!r} holds no slot")
        self._held[peer] -= 1
        if not self._held[peer]:
            del self._held[peer]
        self.in_use -= 1
        return self.in_use == 0

    def held_by(self, peer: str) -> int:
        return self._held[peer]


class CallLimits(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.slots = Slots(per_peer=limits.per_client, total=limits.total, what="calls")

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: grpc.HandlerCallDetails
    ) -> Any:
        handler = await continuation(details)
        if handler is None or str(details.method).startswith(UNCOUNTED_PREFIXES):
            return handler
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, details.method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(handler.stream_unary, details.method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        make = grpc.unary_stream_rpc_method_handler if handler.unary_stream else grpc.stream_stream_rpc_method_handler
        return make(
            self._streaming(handler.unary_stream or handler.stream_stream, details.method),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _unary(self, behavior: Callable[..., Any], method: str) -> Callable[..., Awaitable[Any]]:
        async def limited(request: Any, context: Any) -> Any:
            async with self._slot(context, method):
                return await behavior(request, context)

        return limited

    def _streaming(self, behavior: Callable[..., Any], method: str) -> Callable[..., AsyncIterator[Any]]:
        async def limited(request: Any, context: Any) -> AsyncIterator[Any]:
            async with self._slot(context, method):
                result = behavior(request, context)
                if inspect.isasyncgen(result):
                    async for item in result:
                        yield item
                else:  # a handler that writes with context.write and returns nothing
                    await result

        return limited

    @contextlib.asynccontextmanager
    async def _slot(self, context: Any, method: str) -> AsyncIterator[None]:
        client = peer_of(context)  # a call without a name is refused later anyway
        try:
            self.slots.take(client)
        except ResourceExhausted as e:
            await self._refuse(context, client, method, str(e))
        try:
            yield
        finally:
            self.slots.give(client)

    async def _refuse(self, context: Any, client: str, method: str, why: str) -> None:
        wait = self.limits.retry_after_seconds
        # A client past its limit may retry in a tight loop: rate-limited and counted, see vmrepl.log_limit.
        refused(log, "calls_refused", peer=client, method=method, code="RESOURCE_EXHAUSTED", reason=why)
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"too many calls at once: {why}; retry in {wait:g} s",
            trailing_metadata=((RETRY_AFTER_KEY, str(round(wait * 1000))),),
        )
