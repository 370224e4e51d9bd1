"""Shared test helpers."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from controller import lab


def need_tool(name: str) -> str:
    """A tool the tests need: missing is a failure in CI, a skip on a developer's machine."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed; .ci/run must install it")
        pytest.skip(f"{name} is not installed")
    return path


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
