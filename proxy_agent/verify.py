"""Sampled verification after a changed-range pass: can the change tracking be trusted?

A sample of the blocks the pass did *not* send (0.1% of the disk, at least
16) is read and hashed and compared with the replica's digests. Half the
sample is the first unsent blocks of the disk (boot code, partition tables
and file-system metadata change in nearly every run, so a tracker that loses
changes shows it there first), half is drawn at random from the rest.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from vmrepl.extent import Extent, align_in, complement, merge, split_blocks

SAMPLE_ONE_IN = 1000  # the sample takes one block in this many (at least MIN_SAMPLE)
MIN_SAMPLE = 16


def unsent_blocks(sent: list[Extent], *, disk_size: int, block_size: int) -> Iterator[Extent]:
    """Whole blocks (the last may be short) that no sent extent touched."""
    yield from split_blocks(align_in(complement(merge(sent), 0, disk_size), block_size, disk_size), block_size)


def choose_sample(candidates: list[Extent], *, disk_blocks: int, seed: str) -> list[Extent]:
    """The blocks to check: the first half of the sample from the start, the rest at random."""
    want = min(len(candidates), max(MIN_SAMPLE, -(-disk_blocks // SAMPLE_ONE_IN)))
    head = candidates[: want // 2]
    rest = candidates[want // 2 :]
    tail = random.Random(seed).sample(rest, want - len(head))
    return sorted(head + tail, key=lambda e: e.offset)
