"""The per-client and total bounds on calls a server runs at once (the counting; the interceptor is tested
through a real controller in tests/integration/test_api_load.py)."""

from __future__ import annotations

import pytest

from vmrepl.call_limits import CallCounter, Limits, Refused


def test_each_client_gets_its_own_places_within_the_total() -> None:
    c = CallCounter(Limits(per_client=2, total=3))
    c.acquire("reader")
    c.acquire("reader")
    with pytest.raises(Refused, match="'reader' has 2 calls open"):
        c.acquire("reader")
    c.acquire("operator")  # another certificate is not held up by the reader's
    with pytest.raises(Refused, match="server has 3 calls open"):
        c.acquire("operator")
    c.release("reader")
    c.acquire("operator")
    assert (c.total, c.per_client) == (3, {"reader": 1, "operator": 2})
    for who in ("reader", "operator", "operator"):
        c.release(who)
    assert (c.total, c.per_client) == (0, {})  # nothing kept for clients that left
