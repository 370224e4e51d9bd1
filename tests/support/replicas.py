"""Comparing replicas with their sources."""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from tests.conftest import need_tool
from vmrepl.extent import MiB

if TYPE_CHECKING:
    from tests.integration.controller_env import ControllerEnv


def qemu_identical(a: Path, b: Path) -> bool:
    """Whether two raw images hold the same data (a hole equals zeros)."""
    need_tool("qemu-img")
    out = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(a), str(b)], check=False)
    return out.returncode == 0


def sha256(path: Path) -> str:
    """A file's digest, compared instead of its bytes (which pytest would diff at length)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def assert_replicas_identical(ctl: ControllerEnv, vms: Iterable[str] | None = None, *, job: str = "job1") -> None:
    """Every disk of `vms` (None: of every VM on the host) equals its replica in `job`."""
    # Only the VMs named are read: another folder on the host may hold no readable VM at all.
    pairs = ctl.disks() if vms is None else [(vm, d.id) for vm in vms for d in ctl.vm(vm).manifest.disks]
    for vm, disk in pairs:
        assert qemu_identical(ctl.vm(vm).image(disk), ctl.replica(vm, disk, job=job)), f"{vm}/{disk} differs"
