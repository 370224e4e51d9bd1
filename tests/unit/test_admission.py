"""Admission of calls and streams without sockets: roles before reading, slots, silence, memory release."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from controller import lab
from proxy_agent.transfer import StreamBroken, _transient
from target_agent.receiver import Silence
from target_agent.servicer import ROLES
from vmrepl import memory, rpc
from vmrepl.call_limits import Slots
from vmrepl.errors import DeadlineExceeded, ResourceExhausted
from vmrepl.v1 import target_pb2

# -- Slots ----------------------------------------------------------------------------------------------------


def test_slots_bound_each_peer_and_the_total() -> None:
    s = Slots(per_peer=2, total=3, what="streams")
    s.take("a")
    s.take("a")
    with pytest.raises(ResourceExhausted, match="'a' already has 2 streams open"):
        s.take("a")
    s.take("b")
    with pytest.raises(ResourceExhausted, match="3 streams are open"):
        s.take("c")
    assert (s.in_use, s.held_by("a"), s.held_by("b")) == (3, 2, 1)
    assert not s.give("a")
    s.take("c")  # a slot given back is free for anyone
    assert [s.give(p) for p in ("a", "b")] == [False, False]
    assert s.give("c")  # the last one
    assert s.in_use == 0 and s.held_by("a") == 0


def test_slots_refuse_a_give_without_a_take() -> None:
    s = Slots(per_peer=1, total=1, what="streams")
    with pytest.raises(ValueError, match="holds no slot"):
        s.give("a")
    with pytest.raises(ValueError):
        Slots(per_peer=0, total=1, what="streams")


# -- Silence --------------------------------------------------------------------------------------------------


async def never(reads: list[int]) -> AsyncIterator[bytes]:
    reads.append(1)
    await asyncio.Event().wait()
    yield b""  # pragma: no cover - never reached


async def messages(*items: bytes, gap: float = 0.0) -> AsyncIterator[bytes]:
    for m in items:
        await asyncio.sleep(gap)
        yield m


async def test_silence_ends_a_stream_that_sends_nothing() -> None:
    reads: list[int] = []
    s = Silence(0.2, "silent for 0.2 s")
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(DeadlineExceeded, match=r"silent for 0\.2 s"):
        await s.receive(never(reads))
    assert 0.2 <= loop.time() - t0 < 5
    assert reads == [1]


async def test_silence_returns_messages_then_none_at_the_end() -> None:
    s = Silence(5, "silent")
    it = messages(b"a", b"b")
    assert [await s.receive(it), await s.receive(it), await s.receive(it)] == [b"a", b"b", None]


async def test_work_of_the_target_itself_is_not_silence() -> None:
    """While the receiver waits for the proxy, each step of the target's own work restarts the clock."""
    s = Silence(0.3, "silent")
    it = messages(b"late", gap=0.6)

    async def busy() -> None:
        for _ in range(6):
            await asyncio.sleep(0.1)
            s.touch()

    worker = asyncio.create_task(busy())
    assert await s.receive(it) == b"late"
    await worker


# -- roles before reading -------------------------------------------------------------------------------------


class Aborted(Exception):
    pass


class FakeContext:
    def __init__(self, pem: bytes) -> None:
        self.pem = pem
        self.written: list[Any] = []
        self.status: tuple[grpc.StatusCode, str] | None = None
        self.trailing_metadata: tuple[tuple[str, bytes], ...] = ()

    def auth_context(self) -> dict[str, list[bytes]]:
        return {"x509_pem_cert": [self.pem]}

    async def write(self, message: Any) -> None:
        self.written.append(message)

    async def abort(
        self, code: grpc.StatusCode, details: str, trailing_metadata: tuple[tuple[str, bytes], ...] = ()
    ) -> None:
        self.status = (code, details)
        self.trailing_metadata = trailing_metadata
        raise Aborted


@pytest.fixture(scope="module")
def pems(lab_certs: lab.LabCerts) -> dict[str, bytes]:
    return {name: (lab_certs.directory / f"{name}.pem").read_bytes() for name in ("controller", "proxy", "reader")}


def method(name: str) -> Any:
    return target_pb2.DESCRIPTOR.services_by_name["TargetAgent"].methods_by_name[name]


async def untouchable() -> AsyncIterator[bytes]:
    raise AssertionError("the request was read before the caller's role was checked")
    yield b""  # pragma: no cover


async def test_a_refused_caller_is_refused_before_its_request_is_read(pems: dict[str, bytes]) -> None:
    async def behaviour(request: Any, context: Any) -> Any:
        raise AssertionError("the servicer ran")

    guarded = rpc._guard(
        behaviour, method("PrepareReplicaDisk"), roles=("controller",), parse=None, calls=None, failure=None
    )
    ctx = FakeContext(pems["reader"])
    with pytest.raises(Aborted):
        await guarded(untouchable(), ctx)
    assert ctx.status is not None and ctx.status[0] == grpc.StatusCode.PERMISSION_DENIED
    assert "needs controller" in ctx.status[1] and not ctx.written


async def test_a_refused_stream_is_told_in_band_and_counted(pems: dict[str, bytes]) -> None:
    async def behaviour(requests: Any, context: Any) -> None:
        raise AssertionError("the servicer ran")

    calls = memory.ReleaseWhenIdle(delay=60)
    guarded = rpc._guard(
        behaviour,
        method("Transfer"),
        roles=("proxy",),
        parse=None,
        calls=calls,
        failure=lambda code, message: (code, message),
    )
    ctx = FakeContext(pems["controller"])
    with pytest.raises(Aborted):
        await guarded(untouchable(), ctx)
    assert ctx.written == [("PERMISSION_DENIED", ctx.status[1] if ctx.status else "")]
    assert calls.active == 0


async def test_an_allowed_unary_call_gets_its_parsed_request(pems: dict[str, bytes]) -> None:
    seen: list[Any] = []

    async def behaviour(request: Any, context: Any) -> str:
        seen.append(request)
        return "done"

    parse = target_pb2.GetReplicaDiskRequest.FromString
    guarded = rpc._guard(
        behaviour, method("GetReplicaDisk"), roles=("controller",), parse=parse, calls=None, failure=None
    )
    req = target_pb2.GetReplicaDiskRequest(replica_path="jobs/vm1", disk_id="d")
    assert await guarded(messages(req.SerializeToString()), FakeContext(pems["controller"])) == "done"
    assert seen == [req]
    ctx = FakeContext(pems["controller"])
    with pytest.raises(Aborted):
        await guarded(messages(b"\xff\xff"), ctx)
    assert ctx.status is not None and ctx.status[0] == grpc.StatusCode.INVALID_ARGUMENT


async def test_the_target_declares_roles_for_exactly_its_methods() -> None:
    names = {m.name for m in target_pb2.DESCRIPTOR.services_by_name["TargetAgent"].methods}
    assert set(ROLES) == names
    svc = rpc.Service(
        target_pb2.DESCRIPTOR.services_by_name["TargetAgent"],
        object(),
        roles={k: v for k, v in ROLES.items() if k != "ReadDigests"},
    )
    with pytest.raises(ValueError, match="roles table"):
        rpc._add_service(grpc.aio.server(), svc, None)


# -- memory ---------------------------------------------------------------------------------------------------


async def test_memory_is_released_once_no_call_is_left(monkeypatch: pytest.MonkeyPatch) -> None:
    released: list[int] = []

    def release() -> bool:
        released.append(1)
        return True

    monkeypatch.setattr(memory, "release_free_memory", release)
    idle = memory.ReleaseWhenIdle(delay=0.05)
    idle.enter()
    idle.enter()
    idle.leave()
    await asyncio.sleep(0.15)
    assert released == []  # a call is still in progress
    with idle.counting():
        pass
    idle.leave()
    await asyncio.sleep(0.15)
    assert released == [1] and idle.released == 1


def test_glibc_calls_are_guarded(tmp_path: Path) -> None:
    # Whatever the platform, these answer a boolean and never raise.
    assert isinstance(memory.release_free_memory(), bool)
    assert isinstance(memory.share_one_arena(), bool)


# -- the proxy's side -----------------------------------------------------------------------------------------


def test_the_proxy_resumes_after_deadline_exceeded_and_resource_exhausted() -> None:
    for code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED):
        assert _transient(StreamBroken(code, "the stream was silent for 120 s"))
    assert not _transient(StreamBroken(grpc.StatusCode.PERMISSION_DENIED, "needs proxy"))
