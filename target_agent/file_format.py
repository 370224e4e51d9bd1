"""Format versions of the files the target keeps (state.json, digests.bin, restore-points.json).

Each file says which format wrote it. A reader takes every format up to its own and refuses a newer one
with a clear error instead of misreading it (a target rolled back after a newer one ran, say); files
from before formats were recorded are format 1.
"""

from __future__ import annotations

from vmrepl.errors import FailedPrecondition

UNVERSIONED = 1


def check_format(what: str, found: object, *, reads: int) -> int:
    """The format `found` in the file `what`, if this code reads it (formats 1 to `reads`)."""
    shown = repr(found) if len(repr(found)) <= 40 else repr(found)[:37] + "..."  # a planted 10**400 stays one line
    if isinstance(found, bool) or not isinstance(found, int) or found < 1:
        raise FailedPrecondition(f"{what} has no valid format version ({shown})")
    if found > reads:
        raise FailedPrecondition(
            f"{what} has format {shown}, written by a newer vmrepl; this one reads formats 1 to {reads}"
        )
    return found
