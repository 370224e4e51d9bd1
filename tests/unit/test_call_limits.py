"""The per-client and total bounds on calls a server runs at once (the counting; the interceptor is tested
through a real controller in tests/integration/test_api_load.py, the Transfer streams' use in
tests/unit/test_admission.py)."""

from __future__ import annotations

import pytest

from vmrepl.call_limits import Slots
from vmrepl.errors import ResourceExhausted


def test_each_client_gets_its_own_places_within_the_total() -> None:
    c = Slots(per_peer=2, total=3, what="calls")
    c.take("reader")
    c.take("reader")
    with pytest.raises(ResourceExhausted, match="'reader' already has 2 calls open"):
        c.take("reader")
    c.take("operator")  # another certificate is not held up by the reader's
    with pytest.raises(ResourceExhausted, match="3 calls are open"):
        c.take("operator")
    c.give("reader")
    c.take("operator")
    assert (c.in_use, c.held_by("reader"), c.held_by("operator")) == (3, 1, 2)
    for who in ("reader", "operator", "operator"):
        c.give(who)
    assert c.in_use == 0 and not c._held  # nothing kept for clients that left
