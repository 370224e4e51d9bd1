"""SlotBoard: a proxy that does not answer for a moment is waited for, a gone one is given up on."""

from __future__ import annotations

import asyncio
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


def _fixed(*slots: ProxySlot) -> Callable[[], Awaitable[list[ProxySlot]]]:
    async def proxies() -> list[ProxySlot]:
        return list(slots)

    return proxies


async def _settle() -> None:
    """Lets every task that can run do so (no I/O here, so a bounded number of turns is enough)."""
    for _ in range(50):
        await asyncio.sleep(0)


ONE_SLOT = _fixed(ProxySlot("p1", "proxy1", True, 1, 0, frozenset()))


async def test_a_freed_slot_goes_to_the_session_that_has_started_fewer_tasks() -> None:
    board = SlotBoard()
    await board.acquire(ONE_SLOT, host_id="h", target_id="t", target_max=4, session_id="big")
    big = asyncio.create_task(board.acquire(ONE_SLOT, host_id="h", target_id="t", target_max=4, session_id="big"))
    await _settle()  # the big job's second task waits longest
    small = asyncio.create_task(board.acquire(ONE_SLOT, host_id="h", target_id="t", target_max=4, session_id="small"))
    await _settle()
    assert not big.done() and not small.done()
    await board.release("p1", "t")
    done, _ = await asyncio.wait([big, small], timeout=10, return_when=asyncio.FIRST_COMPLETED)
    assert done == {small}  # one large job does not starve a small one
    await board.release("p1", "t")
    assert (await asyncio.wait_for(big, 10)).proxy_id == "p1"


async def test_a_task_waits_for_its_targets_slot_even_with_proxies_free() -> None:
    board = SlotBoard()
    proxies = _fixed(*(ProxySlot(p, p, True, 4, 0, frozenset()) for p in ("p1", "p2")))
    first = await board.acquire(proxies, host_id="h", target_id="t", target_max=1)
    other_target = await board.acquire(proxies, host_id="h", target_id="t2", target_max=1)
    second = asyncio.create_task(board.acquire(proxies, host_id="h", target_id="t", target_max=1))
    await _settle()
    assert not second.done()
    await board.release(first.proxy_id, "t")
    await _settle()
    assert second.done()  # woken by the release, not by the periodic re-check seconds later
    await board.release(other_target.proxy_id, "t2")


async def test_slots_claimed_by_reattached_tasks_count_before_anything_new_starts() -> None:
    board = SlotBoard()
    board.claim("p1", "t")  # a transfer found running after a controller restart
    proxies = _fixed(*(ProxySlot(p, p, True, 1, 0, frozenset()) for p in ("p1", "p2")))
    slot = await board.acquire(proxies, host_id="h", target_id="t", target_max=4)
    assert slot.proxy_id == "p2"
    waiting = asyncio.create_task(board.acquire(proxies, host_id="h", target_id="t", target_max=4))
    await _settle()
    assert not waiting.done()
    await board.release("p1", "t")
    await _settle()
    assert waiting.done() and waiting.result().proxy_id == "p1"
