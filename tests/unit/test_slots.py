"""SlotBoard: a proxy that does not answer for a moment is waited for, a gone one is given up on."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import pytest

from controller.engine.placement import ProxySlot
from controller.engine.slots import NoProxy, SlotBoard


def _lister(answers: list[bool]) -> tuple[list[int], Callable[[], Awaitable[list[ProxySlot]]]]:
    calls = [0]

    async def proxies() -> list[ProxySlot]:
        i = min(calls[0], len(answers) - 1)
        calls[0] += 1
        return [ProxySlot("p1", "proxy1", answers[i], 2, 0, frozenset())]

    return calls, proxies


async def test_a_proxy_restarting_a_moment_ago_is_waited_for() -> None:
    # Found by the chaos loop: right after a proxy restart every disk failed on one missed health check.
    calls, proxies = _lister([False, False, True])
    board = SlotBoard(no_proxy_grace=10)
    slot = await board.acquire(proxies, host_id="h", target_id="t", target_max=4)
    assert slot.proxy_id == "p1" and calls[0] == 3


async def test_no_proxy_for_longer_than_the_grace_gives_up() -> None:
    _, proxies = _lister([False])
    board = SlotBoard(no_proxy_grace=0.3)
    started = time.monotonic()
    with pytest.raises(NoProxy, match=r"for 0\.3 s"):
        await board.acquire(proxies, host_id="h", target_id="t", target_max=4)
    assert 0.3 <= time.monotonic() - started < 5
