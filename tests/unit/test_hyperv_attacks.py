"""Attacks on the Hyper-V capability that need no socket: a flood of calls against one host, a lying host's
answers to the provider, secrets in the text of errors.

Each test is a finding (or a guard on a defence that held) from attacking the Hyper-V stack as an attacker
and as an unlucky operator would.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from pydantic import SecretStr

from vmrepl.domain import MAX_WINRM_CALLS_PER_HOST
from vmrepl.errors import HostOutputError
from vmrepl.providers.hyperv import models as m
from vmrepl.providers.hyperv.winrm import HostClient, WinRmSettings

SECRET = "Hv-attack-5b1e 'pw' \"x\""


def client(address: str = "hv01.example.com") -> HostClient:
    return HostClient(WinRmSettings(address=address, username="LAB\\replicator", password=SecretStr(SECRET)))


class _Blocking:
    """Stands for the worker thread's WinRM exchange: holds each call until released, counting how many
    run at once per host."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.active: dict[str, int] = {}
        self.peak: dict[str, int] = {}

    def patch(self, c: HostClient) -> None:
        def call(name: str, stdin: bytes, env: dict[str, str], stop: threading.Event) -> Any:
            host = c.settings.address.casefold()
            with self.lock:
                self.active[host] = self.active.get(host, 0) + 1
                self.peak[host] = max(self.peak.get(host, 0), self.active[host])
            try:
                self.release.wait(30)
                raise HostOutputError("released")
            finally:
                with self.lock:
                    self.active[host] -= 1

        c._call = call  # type: ignore[method-assign]

    async def until_active(self, host: str, n: int) -> None:
        for _ in range(1000):  # up to 10 s on a loaded machine
            if self.active.get(host, 0) >= n:
                return
            await asyncio.sleep(0.01)


async def test_a_flood_of_calls_to_one_host_is_bounded_and_leaves_the_controllers_threads_free() -> None:
    # Finding: every script call ran in asyncio's default thread pool (min(32, cores + 4) threads) with no bound
    # per host. A reader calling ListHostVms in a loop against a slow host held every thread of that pool for up
    # to script_timeout_seconds each, so every other `asyncio.to_thread` of the controller (session logs, file
    # hosts) waited behind them, and as many WinRM shells as threads were open on the one host.
    blocking = _Blocking()
    clients = [client("hv01.example.com"), client("HV01.example.com"), client("hv02.example.com")]
    for c in clients:
        blocking.patch(c)
    flood = [
        asyncio.ensure_future(c.run("host_info", m.NoParams()))
        for c in clients
        for _ in range(MAX_WINRM_CALLS_PER_HOST * 3)
    ]
    try:
        await blocking.until_active("hv01.example.com", MAX_WINRM_CALLS_PER_HOST)
        await blocking.until_active("hv02.example.com", MAX_WINRM_CALLS_PER_HOST)
        # The rest of the controller still gets a thread while the hosts hold theirs.
        assert await asyncio.wait_for(asyncio.to_thread(lambda: "free"), 10) == "free"
        await asyncio.sleep(0.2)
        # One bound per host, whichever client (or letter case of the address) the calls came through.
        assert blocking.peak == {
            "hv01.example.com": MAX_WINRM_CALLS_PER_HOST,
            "hv02.example.com": MAX_WINRM_CALLS_PER_HOST,
        }
    finally:
        blocking.release.set()
        results = await asyncio.gather(*flood, return_exceptions=True)
    assert all(isinstance(r, HostOutputError) for r in results)


async def test_a_cancelled_call_keeps_its_slot_until_its_thread_has_ended() -> None:
    # A cancelled caller's thread goes on until its next Receive: its slot is free only then, or a caller that
    # cancels and retries in a loop would open shells past the bound.
    blocking = _Blocking()
    c = client("hv03.example.com")
    blocking.patch(c)
    first = [asyncio.ensure_future(c.run("host_info", m.NoParams())) for _ in range(MAX_WINRM_CALLS_PER_HOST)]
    await blocking.until_active("hv03.example.com", MAX_WINRM_CALLS_PER_HOST)
    for t in first:
        t.cancel()
    await asyncio.gather(*first, return_exceptions=True)
    more = [asyncio.ensure_future(c.run("host_info", m.NoParams())) for _ in range(MAX_WINRM_CALLS_PER_HOST)]
    await asyncio.sleep(0.2)
    assert blocking.peak["hv03.example.com"] == MAX_WINRM_CALLS_PER_HOST
    blocking.release.set()
    assert all(isinstance(r, HostOutputError) for r in await asyncio.gather(*more, return_exceptions=True))
