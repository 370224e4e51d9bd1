"""The pass digest: one value type for both ends, which must agree at every resume and at the end of the disk."""

from collections.abc import Sequence

import pytest

from proxy_agent.pass_digest import PassDigestTracker
from vmrepl.batch import DATA, ZERO, PassDigest
from vmrepl.errors import ChecksumMismatch, InvalidArgument

EXTENTS = [(0, 10, DATA, b"d" * 16), (10, 30, ZERO, b""), (40, 10, DATA, b"e" * 16)]


def of(extents: Sequence[tuple[int, int, int, bytes]]) -> PassDigest:
    d = PassDigest()
    for e in extents:
        d = d.add(*e)
    return d


def test_digest_is_independent_of_batching_order() -> None:
    a, b = of(EXTENTS), of(list(reversed(EXTENTS)))
    assert a == b and PassDigest.from_wire(a.to_wire()) == a and PassDigest.from_state(a.to_state()) == a
    assert of(EXTENTS[:1]).merge(of(EXTENTS[1:])) == a  # batches merge in any order
    moved = of([EXTENTS[0], EXTENTS[1], (50, 10, DATA, b"e" * 16)])  # the same bytes at another offset
    assert moved != a


def test_wire_and_state_forms_are_checked() -> None:
    assert PassDigest.from_wire(b"") == PassDigest() == PassDigest.from_state("")  # older peers, fresh passes
    assert PassDigest(1).to_wire() == bytes(15) + b"\x01" and PassDigest(255).to_state() == "0" * 30 + "ff"
    with pytest.raises(InvalidArgument, match="16 bytes"):
        PassDigest.from_wire(b"abc", field="ack.session_digest")
    with pytest.raises(ValueError):
        PassDigest.from_state("abc")
    with pytest.raises(ValueError):
        PassDigest(1 << 128)
    assert PassDigest((1 << 128) - 1).merge(PassDigest(2)) == PassDigest(1)  # modulo 2^128


def test_resume_adopts_or_checks_the_target_value() -> None:
    t = PassDigestTracker(number=0, disk_size=100)
    t.resume(0, PassDigest())  # a fresh pass
    t.sent(40, PassDigest(1234))
    t.sent(80, PassDigest(4444))
    t.resume(40, PassDigest(1234))  # the stream broke after the batch ending at 40 was committed
    assert t.digest == PassDigest(1234)
    with pytest.raises(ChecksumMismatch, match="offset 40"):
        t.resume(40, PassDigest(999))
    # A proxy that restarted has no snapshot for the target's offset: it continues from the target's value.
    q = PassDigestTracker(number=0, disk_size=100)
    q.resume(60, PassDigest(42))
    assert q.digest == PassDigest(42)


def test_end_of_disk_mismatch_fails_the_disk() -> None:
    t = PassDigestTracker(number=0, disk_size=100)
    t.resume(0, PassDigest())
    t.sent(100, PassDigest(77))
    t.committed(100)
    t.check_end(PassDigest(77))
    with pytest.raises(ChecksumMismatch, match="end of disk"):
        t.check_end(PassDigest(78))
    never_sent = PassDigestTracker(number=1, disk_size=100)
    with pytest.raises(ChecksumMismatch):
        never_sent.check_end(PassDigest())
