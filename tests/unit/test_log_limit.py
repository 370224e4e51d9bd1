"""The rate limit on refused calls' log lines (vmrepl.log_limit): pure logic, a fake clock, no sockets."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client import REGISTRY

from vmrepl import call_limits, log_limit
from vmrepl.log_limit import LogLimiter, peer_of, refused


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Lines:
    """A logger that keeps what it is asked to write."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.lines.append(("warning", event, fields))

    def exception(self, event: str, **fields: Any) -> None:
        self.lines.append(("exception", event, fields))


def test_the_first_lines_of_a_burst_are_written_and_the_rest_only_counted() -> None:
    clock, out = Clock(), Lines()
    limiter = LogLimiter(burst=3, window_seconds=60, clock=clock)
    written = [limiter.warning("k", out, "rpc_failed", n=i) for i in range(10)]
    assert written == [True] * 3 + [False] * 7
    assert [f["n"] for _, _, f in out.lines] == [0, 1, 2]
    other = limiter.warning("other key", out, "rpc_failed", n=99)
    assert other and out.lines[-1][2] == {"n": 99}  # another key has its own budget


def test_when_the_window_ends_one_summary_counts_the_suppressed_lines_and_a_new_burst_starts() -> None:
    clock, out = Clock(), Lines()
    limiter = LogLimiter(burst=2, window_seconds=60, clock=clock)
    for i in range(12):
        limiter.warning(("peer", "M", "PERMISSION_DENIED"), out, "rpc_failed", method="M", n=i)
    clock.now += 59.9
    limiter.flush()
    assert len(out.lines) == 2  # the window has not ended yet
    clock.now += 0.2
    assert limiter.warning(("peer", "M", "PERMISSION_DENIED"), out, "rpc_failed", method="M", n=12)
    summary, fresh = out.lines[2:]
    assert summary == ("warning", "rpc_failed", {"method": "M", "n": 11, "suppressed": 10})
    assert fresh == ("warning", "rpc_failed", {"method": "M", "n": 12})


def test_flush_writes_the_summary_without_waiting_for_another_line() -> None:
    clock, out = Clock(), Lines()
    limiter = LogLimiter(burst=1, window_seconds=10, clock=clock)
    for _ in range(5):
        limiter.warning("k", out, "calls_refused", reason="r")
    clock.now += 10
    limiter.flush()
    assert out.lines[-1] == ("warning", "calls_refused", {"reason": "r", "suppressed": 4})
    assert len(limiter) == 0
    limiter.flush()
    assert len(out.lines) == 2  # a window is summarised once


def test_a_window_with_nothing_suppressed_ends_without_a_summary() -> None:
    clock, out = Clock(), Lines()
    limiter = LogLimiter(burst=3, window_seconds=10, clock=clock)
    limiter.warning("k", out, "rpc_failed")
    clock.now += 11
    limiter.flush()
    assert len(out.lines) == 1 and len(limiter) == 0


def test_a_flood_of_distinct_keys_keeps_at_most_max_keys_and_summarises_the_evicted() -> None:
    clock, out = Clock(), Lines()
    limiter = LogLimiter(burst=1, window_seconds=60, max_keys=3, clock=clock)
    limiter.warning("first", out, "rpc_failed", peer="first")
    limiter.warning("first", out, "rpc_failed", peer="first")  # suppressed
    for i in range(1000):
        limiter.warning(f"peer-{i}", out, "rpc_failed", peer=f"peer-{i}")
        assert len(limiter) <= 3
    assert ("warning", "rpc_failed", {"peer": "first", "suppressed": 1}) in out.lines


def test_exc_info_lines_keep_their_traceback_but_the_summary_does_not() -> None:
    clock, out = Clock(), Lines()
    limiter = LogLimiter(burst=1, window_seconds=60, clock=clock)
    limiter.warning("k", out, "rpc_internal_error", exc_info=True)
    limiter.warning("k", out, "rpc_internal_error", exc_info=True)
    clock.now += 60
    limiter.flush()
    assert [level for level, _, _ in out.lines] == ["exception", "warning"]


def test_bad_settings_are_refused() -> None:
    for bad in ({"burst": 0}, {"window_seconds": 0}, {"max_keys": 0}):
        with pytest.raises(ValueError):
            LogLimiter(**bad)  # type: ignore[arg-type]


def test_refused_counts_every_call_even_the_unlogged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(log_limit, "REFUSALS", LogLimiter(burst=2, clock=Clock()))
    labels = {"method": "test.Counted", "code": "PERMISSION_DENIED"}
    before = REGISTRY.get_sample_value("vmrepl_rpc_refused_total", labels) or 0.0
    out = Lines()
    for _ in range(50):
        refused(out, "rpc_failed", peer="p", method="test.Counted", code="PERMISSION_DENIED", error="no")
    assert REGISTRY.get_sample_value("vmrepl_rpc_refused_total", labels) == before + 50
    assert out.lines[0] == (
        "warning",
        "rpc_failed",
        {"peer": "p", "method": "test.Counted", "code": "PERMISSION_DENIED", "error": "no"},
    )
    assert len(out.lines) == 2


class _Anonymous:
    def auth_context(self) -> dict[str, list[bytes]]:
        return {}

    def peer(self) -> str:
        return "ipv4:10.0.0.7:51234"


def test_a_caller_without_a_certificate_is_keyed_by_its_address_without_the_port() -> None:
    assert peer_of(_Anonymous()) == "ipv4:10.0.0.7"


class _Refused(Exception):
    pass


class _AbortingContext:
    async def abort(self, code: Any, details: str, trailing_metadata: Any = ()) -> None:
        raise _Refused(code)


async def test_calls_refused_by_the_call_limits_go_through_the_same_limit_and_counter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(log_limit, "REFUSALS", LogLimiter(burst=3, clock=Clock()))
    out = Lines()
    monkeypatch.setattr(call_limits, "log", out)
    labels = {"method": "/test.Limited/Call", "code": "RESOURCE_EXHAUSTED"}
    before = REGISTRY.get_sample_value("vmrepl_rpc_refused_total", labels) or 0.0
    limits = call_limits.CallLimits(call_limits.Limits(per_client=1, total=1))
    for _ in range(40):
        with pytest.raises(_Refused):
            await limits._refuse(_AbortingContext(), "dashboard", "/test.Limited/Call", "too many")
    assert REGISTRY.get_sample_value("vmrepl_rpc_refused_total", labels) == before + 40
    assert [(event, f["peer"], f["reason"]) for _, event, f in out.lines] == [
        ("calls_refused", "dashboard", "too many")
    ] * 3


async def test_on_an_event_loop_the_summary_comes_when_the_window_ends_without_another_line() -> None:
    out = Lines()
    limiter = LogLimiter(burst=1, window_seconds=0.05)
    for _ in range(3):
        limiter.warning("k", out, "rpc_failed")
    for _ in range(100):  # up to 5 s on a loaded machine; normally one or two turns
        if len(out.lines) == 2:
            break
        await asyncio.sleep(0.05)
    assert out.lines[-1] == ("warning", "rpc_failed", {"suppressed": 2})
    assert len(limiter) == 0
