"""How the controller waits for an agent to answer (no sockets: the agent's health check is a fake)."""

from __future__ import annotations

import time
from typing import Any

from controller.engine.agents import ready


class Agent:
    """Answers its health check from a list, then never again."""

    address = "127.0.0.1:1"

    def __init__(self, answers: list[bool]) -> None:
        self.answers = answers
        self.asked: list[dict[str, Any]] = []

    async def healthy(self, *, within: float = 5.0, wait_for_ready: bool = False) -> bool:
        self.asked.append({"within": within, "wait_for_ready": wait_for_ready})
        return self.answers.pop(0) if self.answers else False


async def test_an_agent_that_answers_after_failed_checks_is_ready() -> None:
    agent = Agent([False, False, True])
    assert await ready(agent, within=10)
    assert len(agent.asked) == 3 and all(a["wait_for_ready"] for a in agent.asked)


async def test_an_agent_that_never_answers_is_given_up_on_in_bounded_time() -> None:
    agent = Agent([])
    t0 = time.monotonic()
    assert not await ready(agent, within=1.0)
    assert time.monotonic() - t0 < 4 and len(agent.asked) >= 2 and all(a["within"] <= 1.0 for a in agent.asked)
