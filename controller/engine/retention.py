"""Restore-point retention: pure."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence


def points_to_delete(points: Sequence[tuple[str, dt.datetime]], keep: int) -> list[str]:
    """Ids of the oldest points beyond the newest `keep` (at least one is always kept)."""
    if keep < 1:
        raise ValueError("restore points to keep must be at least 1")
    ordered = sorted(points, key=lambda p: (p[1], p[0]))
    return [pid for pid, _ in ordered[: max(0, len(ordered) - keep)]]
