"""How the controller waits for an agent to answer (no sockets: the health check itself is replaced)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from controller.engine.agents import AgentClient, AgentPool
from vmrepl.config import TlsSettings


class Pool(AgentPool):
    def __init__(self, answers: list[bool]) -> None:
        super().__init__(TlsSettings(ca_file=Path("ca"), cert_file=Path("c"), key_file=Path("k")))
        self.answers = answers
        self.asked: list[dict[str, Any]] = []

    async def healthy(self, client: AgentClient, *, within: float = 5.0, wait_for_ready: bool = False) -> bool:
        self.asked.append({"within": within, "wait_for_ready": wait_for_ready})
        return self.answers.pop(0) if self.answers else False


CLIENT = AgentClient("127.0.0.1:1", None, None)


async def test_an_agent_that_answers_after_failed_checks_is_ready() -> None:
    pool = Pool([False, False, True])
    assert await pool.ready(CLIENT, within=10)
    assert len(pool.asked) == 3 and all(a["wait_for_ready"] for a in pool.asked)


async def test_an_agent_that_never_answers_is_given_up_on_in_bounded_time() -> None:
    pool = Pool([])
    t0 = time.monotonic()
    assert not await pool.ready(CLIENT, within=1.0)
    assert time.monotonic() - t0 < 4 and len(pool.asked) >= 2 and all(a["within"] <= 1.0 for a in pool.asked)
