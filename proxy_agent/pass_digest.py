"""The proxy's side of a pass digest: what it sent, checked against what the target committed.

The proxy keeps the pass digest at every batch end the target has not acknowledged yet, so a stream
that resumes at any of them can check that the target's digest there is the proxy's; at the end of the
disk the two digests over the whole pass must be equal.
"""

from __future__ import annotations

from vmrepl.batch import PassDigest
from vmrepl.errors import ChecksumMismatch
from vmrepl.logs import get_logger

log = get_logger("vmrepl.proxy.transfer")


class PassDigestTracker:
    def __init__(self, *, number: int, disk_size: int) -> None:
        self.number = number
        self._disk_size = disk_size
        self.digest = PassDigest()
        # Digest at each batch end not yet committed; None until the target first accepted a stream.
        self._snapshots: dict[int, PassDigest] | None = None

    def resume(self, offset: int, target: PassDigest) -> None:
        """A stream was accepted at `offset` with the target's digest below it: continue from there."""
        mine = self._snapshots.get(offset) if self._snapshots is not None else None
        if mine is not None and mine != target:
            raise ChecksumMismatch(f"the target's session digest at offset {offset} differs from the proxy's")
        # Otherwise a fresh pass, or a prefix another proxy process sent: start from the target's value.
        self.digest = target
        self._snapshots = {offset: target}

    def sent(self, end: int, batch: PassDigest) -> None:
        """The batch that ends at `end`, whose own digest is `batch`, was sent."""
        self.digest = self.digest.merge(batch)
        if self._snapshots is not None:
            self._snapshots[end] = self.digest

    def committed(self, offset: int) -> None:
        """The target made everything below `offset` durable: no stream resumes below it any more."""
        if self._snapshots is not None:
            self._snapshots = {k: v for k, v in self._snapshots.items() if k >= offset}

    def check_end(self, target: PassDigest) -> None:
        mine = self._snapshots.get(self._disk_size) if self._snapshots is not None else None
        if mine is None or mine != target:
            raise ChecksumMismatch(
                f"end of disk, pass {self.number + 1}: the target's digest over everything it received differs "
                "from the proxy's over everything it sent"
            )
        log.info("session_digest_matches", pass_number=self.number, digest=str(target))
