"""The session digest: both ends must agree at every resume and at the end of the disk."""

import pytest

from proxy_agent.plan import make_plan
from proxy_agent.transfer import DiskTransfer, _Pass
from vmrepl.batch import DATA, ZERO, SessionDigest
from vmrepl.errors import ChecksumMismatch
from vmrepl.extent import Extent

PLAN = make_plan(disk_size=100, block_size=10, allocated=[Extent(0, 100)], changed=None, excluded=[])


def a_pass() -> _Pass:
    return _Pass(0, PLAN, builder=None)  # type: ignore[arg-type]


def test_digest_is_independent_of_batching_order() -> None:
    a, b = SessionDigest(), SessionDigest()
    extents = [(0, 10, DATA, b"d" * 16), (10, 30, ZERO, b""), (40, 10, DATA, b"e" * 16)]
    for e in extents:
        a.add(*e)
    for e in reversed(extents):
        b.add(*e)
    assert a.digest() == b.digest() and SessionDigest(a.digest()).value == a.value
    c = SessionDigest()
    c.add(0, 10, DATA, b"d" * 16)
    c.add(10, 30, ZERO, b"")
    c.add(50, 10, DATA, b"e" * 16)  # the same bytes at another offset
    assert c.digest() != a.digest()


def test_resume_adopts_or_checks_the_target_value() -> None:
    p = a_pass()
    DiskTransfer._adopt_digest(p, 0, 0)  # a fresh pass
    p.snapshots = {0: 0, 40: 1234, 80: 5678}
    DiskTransfer._adopt_digest(p, 40, 1234)
    assert p.digest == 1234 and p.snapshots == {40: 1234}
    p.snapshots = {40: 1234}
    with pytest.raises(ChecksumMismatch, match="offset 40"):
        DiskTransfer._adopt_digest(p, 40, 999)
    # A proxy that restarted has no snapshot for the target's offset: it continues from the target's value.
    q = a_pass()
    DiskTransfer._adopt_digest(q, 60, 42)
    assert q.digest == 42


def test_end_of_disk_mismatch_fails_the_disk() -> None:
    t = DiskTransfer.__new__(DiskTransfer)
    t.plan = PLAN
    p = a_pass()
    p.snapshots = {100: 77}
    t._check_end_digest(p, 77)
    with pytest.raises(ChecksumMismatch, match="end of disk"):
        t._check_end_digest(p, 78)
    p.snapshots = {}
    with pytest.raises(ChecksumMismatch):
        t._check_end_digest(p, 77)
