"""Rules for the names and relative paths callers send (ids, replica paths).

A name is letters, digits, '.', '_' and '-', starting with a letter or digit;
a relative path is up to eight names joined by '/'. Anything else, notably
'..', absolute paths, drive letters and backslashes, is refused.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from vmrepl.errors import PathError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_DEPTH = 8


def check_name(field: str, value: str) -> str:
    if not _NAME.fullmatch(value) or value in (".", ".."):
        raise PathError(field, f"{value!r} is not a plain name (letters, digits, '.', '_', '-'; up to 128)")
    return value


def check_relative(field: str, value: str) -> list[str]:
    if not value:
        raise PathError(field, "is required")
    if value.startswith(("/", "\\")) or "\\" in value or re.match(r"^[A-Za-z]:", value):
        raise PathError(field, f"{value!r} must be a relative path with '/' separators")
    parts = value.split("/")
    if len(parts) > MAX_DEPTH:
        raise PathError(field, f"{value!r} is deeper than {MAX_DEPTH} components")
    for part in parts:
        if part in ("", ".", ".."):
            raise PathError(field, f"{value!r} has an empty, '.' or '..' component")
        check_name(field, part)
    return parts


# The one folder name starting with '.' a replica path may begin with: failback disks are kept there on the
# target next to the original VM (target_agent.failback), apart from every job's replicas, whose paths are
# plain names that cannot start with a dot.
FAILBACK_ROOT = ".failback"


def check_replica_path(field: str, value: str) -> list[str]:
    """A replica path's components: a relative path (check_relative), or one under `.failback/`."""
    if value.startswith(FAILBACK_ROOT + "/"):
        return [FAILBACK_ROOT, *check_relative(field, value[len(FAILBACK_ROOT) + 1 :])]
    return check_relative(field, value)


def resolve_inside(field: str, path: Path, roots: Iterable[Path], *, what: str) -> Path:
    """`path` with every symlink resolved, if that lies strictly inside one of `roots` (resolved too)."""
    real = Path(os.path.realpath(path))
    for root in roots:
        if Path(os.path.realpath(root)) in real.parents:
            return real
    raise PathError(field, f"resolves outside {what}")
