"""Figures a user reads about a task or a session, and the bottleneck. Pure.

The proxy reports how long each pipeline stage was busy: reading the source and compressing (summed
over its worker threads), waiting on the network or the target's window, and the target's write
(decompress, verify, write, flush). A stage's share is its busy time over the elapsed time (per thread
for the threaded stages); the bottleneck is the stage with the largest share, as in Veeam's statistics.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from vmrepl.progress import StageBusy

STAGES = ("source", "proxy", "network", "target")


@dataclass(frozen=True)
class Shares:
    source: float = 0.0
    proxy: float = 0.0
    network: float = 0.0
    target: float = 0.0

    def bottleneck(self) -> str:
        values = {s: getattr(self, s) for s in STAGES}
        stage = max(values, key=lambda s: values[s])
        return stage if values[stage] > 0 else ""


def shares(busy: Iterable[tuple[StageBusy, float]]) -> Shares:
    """Stage shares over one or more transfers: each given as (busy figures, elapsed seconds)."""
    total = dict.fromkeys(STAGES, 0.0)
    elapsed = 0.0
    for figures, seconds in busy:
        for stage, value in figures.seconds().items():
            total[stage] += value
        elapsed += seconds
    if elapsed <= 0:
        return Shares()
    return Shares(**{s: min(1.0, total[s] / elapsed) for s in STAGES})


def rate(processed: int, seconds: float) -> float:
    return processed / seconds if seconds > 0 else 0.0


def compression_ratio(data: int, sent: int) -> float:
    """Raw data bytes per byte on the wire (2.0: half the size); 0 when nothing was sent."""
    return data / sent if sent > 0 else 0.0
