"""Shared test helpers."""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from types import FrameType

import pytest

from controller import lab
from tests.support.certs import lab_certs  # noqa: F401  (the fixture, for every test)


def need_tool(name: str) -> str:
    """A tool the tests need: missing is a failure in CI, a skip on a developer's machine."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed; .ci/run must install it")
        pytest.skip(f"{name} is not installed")
    return path


def pytest_configure(config: pytest.Config) -> None:
    """A SIGTERM to the test run (a CI timeout, `timeout(1)`) stops the agents before the run dies: they run
    in their own process groups, so a signal to the run's group misses them, and atexit hooks do not run
    when a signal ends a program."""
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return  # someone else handles it

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        lab.stop_all(timeout=5)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)  # and end as SIGTERM would have

    signal.signal(signal.SIGTERM, on_sigterm)


@pytest.fixture(autouse=True)
def no_agent_left_running() -> Iterator[None]:
    """After every test and all its fixtures' teardowns: no agent process it started may still run.

    A leftover is a fixture that lost track of a process (say, one restarted under it): stopped here, and
    reported as an error of the test, so the fixture gets mended rather than the process outliving the run.
    """
    before = set(lab.running_agents())
    yield
    left = [p for p in lab.running_agents() if p not in before]
    for p in left:
        p.stop(timeout=5)
    if left:
        pytest.fail(f"the test left agent processes running: {', '.join(f'{p.module} (pid {p.pid})' for p in left)}")
