"""Shared test helpers."""

from __future__ import annotations

import os
import shutil

import pytest


def need_tool(name: str) -> str:
    """A tool the tests need: missing is a failure in CI, a skip on a developer's machine."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed; .ci/run must install it")
        pytest.skip(f"{name} is not installed")
    return path
