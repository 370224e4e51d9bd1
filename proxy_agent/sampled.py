"""Sampled verification after a changed-range pass: do the blocks it did not send match the replica?

A sample of the unsent blocks (proxy_agent/verify.py chooses it) is read and hashed at the source and
compared with the replica's digests; any mismatch, or an unknown digest, means the change tracking lost
writes and the disk must be re-run as a full digest comparison.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass

from proxy_agent.plan import Plan
from proxy_agent.verify import choose_sample, unsent_blocks
from vmrepl.block import DIGEST_SIZE, digest, is_zero, zero_digest
from vmrepl.disk.base import DiskReader
from vmrepl.extent import Extent


@dataclass(frozen=True, slots=True)
class SampleOutcome:
    mismatched: int
    sampled: int
    # Source bytes read to hash the sample.
    read_bytes: int

    @property
    def passed(self) -> bool:
        return self.mismatched == 0

    def describe(self) -> str:
        if self.passed:
            return f"passed: {self.sampled} unsent blocks sampled, all match the replica"
        return (
            f"failed: {self.mismatched} of {self.sampled} sampled unsent blocks differ from the replica, so the "
            "change tracking cannot be trusted; the disk was re-run as a full digest comparison"
        )


class SampledVerification:
    def __init__(
        self,
        *,
        reader: DiskReader,
        plan: Plan,
        block_size: int,
        seed: str,
        replica_digests: Callable[[], Awaitable[bytes]],
    ) -> None:
        self._reader = reader
        self._plan = plan
        self._block_size = block_size
        self._seed = seed
        self._replica_digests = replica_digests

    async def run(self, executor: Executor) -> SampleOutcome:
        bs, size = self._block_size, self._plan.disk_size
        candidates = list(unsent_blocks(self._plan.read + self._plan.zero, disk_size=size, block_size=bs))
        sample = choose_sample(candidates, disk_blocks=-(-size // bs), seed=self._seed)
        if not sample:
            return SampleOutcome(0, 0, 0)
        table = await self._replica_digests()
        loop = asyncio.get_running_loop()
        mine = await loop.run_in_executor(executor, self._hash_blocks, sample)
        mismatched = 0
        for block, d in zip(sample, mine, strict=True):
            at = block.offset // bs * DIGEST_SIZE
            if table[at : at + DIGEST_SIZE] != d:
                mismatched += 1
        return SampleOutcome(mismatched, len(sample), sum(b.length for b in sample))

    def _hash_blocks(self, blocks: list[Extent]) -> list[bytes]:
        out = []
        for b in blocks:
            buf = bytearray(b.length)
            self._reader.read_into(memoryview(buf), b.offset)
            out.append(zero_digest(b.length) if is_zero(buf) else digest(buf))
        return out
