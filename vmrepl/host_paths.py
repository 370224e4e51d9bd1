r"""Paths on a Hyper-V host (`C:\ClusterStorage\Volume1\vm\disk.vhdx`, `\\fs01\vms\disk.vhdx`) and where an
agent finds them: the `host_paths` mappings of its configuration. A proxy reads a host's disks through them
(docs/proxy-agent.md, "Disks at Hyper-V host paths"); a target writes an original disk a failback names by its
host path through them (docs/target-agent.md, "Failback disks").

Windows paths compare case-insensitively with `\` and `/` equivalent; the longest matching prefix wins. What
follows the prefix is taken only as plain names: never `..` or `.`, an empty component, a drive letter or an
alternate data stream (`:`), a wildcard, a DOS device name (`NUL`, `COM1.txt`), or a name ending in a dot or a
space (Windows drops those, so the name would mean another file here). The file system checks (no symbolic
link below the local folder, a regular file, inside the source roots or failback roots) are the caller's:
proxy_agent.request, target_agent.failback.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from vmrepl.errors import PathError

_DRIVE = re.compile(r"^[A-Za-z]:\\")
# Characters Windows forbids in a name; ':' also covers drive letters and alternate data streams.
_FORBIDDEN = frozenset('<>:"|?*') | frozenset(chr(c) for c in range(32))
_DEVICES = frozenset(
    {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"}
    | {f"{kind}{n}" for kind in ("COM", "LPT") for n in (*"123456789", "\u00b9", "\u00b2", "\u00b3")}
)
MAX_NAME = 255


class Mapping(Protocol):
    """`host_prefix` (canonical, see check_prefix) is found at the agent's folder `local` (HostPathMapping)."""

    @property
    def host_prefix(self) -> str: ...

    @property
    def local(self) -> Path: ...


M = TypeVar("M", bound=Mapping)


def is_host_path(value: str) -> bool:
    r"""A Windows absolute path: a drive (`C:\`) or a UNC (`\\server\share`) path, either separator."""
    s = value.replace("/", "\\")
    return bool(_DRIVE.match(s)) or s.startswith("\\\\")


def _canonical(value: str) -> str:
    r"""`/` as `\`; the Win32 long-path forms `\\?\C:\x` and `\\?\UNC\srv\share\x` as `C:\x`, `\\srv\share\x`."""
    s = value.replace("/", "\\")
    if s[:8].upper() == "\\\\?\\UNC\\":
        return "\\\\" + s[8:]
    if s.startswith("\\\\?\\") and _DRIVE.match(s[4:]):
        return s[4:]
    return s


def fold(s: str) -> str:
    """Case-folded one character for one (so offsets stay those of `s`), as Windows' upcase table compares."""
    return "".join(u if len(u := c.upper()) == 1 else c for c in s)


def check_name(field: str, name: str, whole: str) -> None:
    """One component of a Windows path, as a plain name that means the same file here as on the host."""
    if name in ("", ".", ".."):
        raise PathError(field, f"{whole!r} has an empty, '.' or '..' component")
    if bad := sorted(set(name) & _FORBIDDEN):
        what = "a drive letter or an alternate data stream" if ":" in bad else f"the character(s) {bad!r}"
        raise PathError(field, f"{whole!r} has {what} in {name!r}")
    if name[-1] in ". ":
        raise PathError(field, f"{whole!r} has a name ending in a dot or a space ({name!r})")
    if name.split(".", 1)[0].rstrip(" ").upper() in _DEVICES:
        raise PathError(field, f"{whole!r} names the DOS device {name!r}")
    if len(name) > MAX_NAME:
        raise PathError(field, f"{whole!r} has a name longer than {MAX_NAME} characters")


def check_prefix(value: str) -> str:
    r"""A mapping's `host_prefix`, canonical: a drive or `\\server\share` root and plain names, ending in `\`."""
    s = value.replace("/", "\\").rstrip("\\") + "\\"
    if _DRIVE.match(s):
        names = s[3:-1].split("\\") if len(s) > 3 else []
    elif s.startswith("\\\\"):
        names = s[2:-1].split("\\")
        if len(names) < 2:
            raise PathError("host_prefix", f"{value!r}: a UNC prefix names a server and a share (\\\\server\\share\\)")
    else:
        raise PathError("host_prefix", f"{value!r} is not a Windows path (C:\\... or \\\\server\\share\\...)")
    for name in names:
        check_name("host_prefix", name, value)
    return s


def map_host_path(value: str, mappings: Iterable[M], *, field: str) -> tuple[Path, M] | None:
    """The local path a host path maps to and the mapping used (the longest prefix), or None when no mapping's
    prefix matches. Raises PathError when what follows the prefix is not plain names."""
    s = _canonical(value)
    key = fold(s)
    best = max(
        (m for m in mappings if key.startswith(fold(m.host_prefix))), key=lambda m: len(m.host_prefix), default=None
    )
    if best is None:
        return None
    names = s[len(best.host_prefix) :].split("\\")
    for name in names:
        check_name(field, name, value)
    return best.local.joinpath(*names), best


def chain_roots(mappings: Sequence[Mapping], source_roots: Sequence[Path]) -> list[Path]:
    """Where a differencing chain's parents may be: the mapped folders, narrowed to the source roots if set."""
    if not source_roots:
        return [m.local for m in mappings]
    if not mappings:
        return list(source_roots)
    out: dict[Path, None] = {}
    for m in mappings:
        for root in source_roots:
            if root == m.local or m.local in root.parents:
                out[root] = None
            elif root in m.local.parents:
                out[m.local] = None
    return list(out)


class HostPathMapping(BaseModel):
    """What the Hyper-V host names under `host_prefix` is under `local` here (docs/proxy-agent.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host_prefix: str = Field(
        min_length=3, max_length=1024, description=r"a Windows folder: C:\ClusterStorage\Volume1 or \\fs01\vms"
    )
    local: Path = Field(description="the absolute local folder holding what the host has under host_prefix")

    @field_validator("host_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        try:
            return check_prefix(value)
        except PathError as e:
            raise ValueError(e.description) from e

    @field_validator("local")
    @classmethod
    def _local(cls, value: Path) -> Path:
        if not value.is_absolute():
            raise ValueError("must be an absolute path")
        return Path(os.path.normpath(value))
