"""The Hyper-V host model's persistent state: what `<root>/host.json` holds (pydantic, so a test, a demo or a
second process can read it), and the Windows-path mapping onto `<root>/drives/`."""

from __future__ import annotations

import os
import re
from pathlib import Path, PureWindowsPath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# What a checkpoint made by a user (not a backup application) reports as VirtualSystemType.
REALIZED_SNAPSHOT = "Microsoft:Hyper-V:Snapshot:Realized"

_DRIVE = re.compile(r"^[A-Za-z]:\\")


class _State(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DiskState(_State):
    instance_id: str  # the VM's SASD InstanceID: Microsoft:<VMID>\<controller GUID>\<ctrl#>\<loc>\D
    controller_type: Literal["SCSI", "IDE"]
    controller_number: int
    controller_location: int
    chain: list[str]  # Windows paths, base .vhdx first; the last is the file the VM writes now
    size: int
    block_size: int
    rct_guid: str  # the disk's change-tracking identity; a new one when tracking is reset
    seq: int = 0  # the number of guest writes so far: an RCT id's counter
    writes: list[tuple[int, int, int]] = Field(default_factory=list)  # (seq, offset, length) of every write


class NicState(_State):
    name: str
    switch: str | None
    mac: str
    dynamic_mac: bool = False
    vlan_id: int | None = None


class VmState(_State):
    id: str
    name: str
    state: str = "Running"
    generation: int = 2
    version: str = "9.0"
    secure_boot: bool | None = True
    secure_boot_template: str | None = "MicrosoftWindows"
    tpm: bool | None = False
    processors: int = 2
    memory_startup: int = 2 * 1024**3
    dynamic_memory: bool = False
    memory_minimum: int = 512 * 1024**2
    memory_maximum: int = 1024**4
    checkpoint_type: str = "Production"
    notes: str = ""
    nics: list[NicState] = Field(default_factory=list)
    disks: list[DiskState] = Field(default_factory=list)
    unsupported_disks: list[str] = Field(default_factory=list)
    rct_enabled: bool = True
    # Failover: where New-VM -Path put it (None for a seeded VM), whether a vTPM key protector was made, how
    # the guest answers InitiateShutdown ("clean": off after `shutdown_polls` power polls; "ignores": stays
    # running; "none": no shutdown integration service), and how many polls a shutdown under way has left.
    folder: str | None = None
    key_protector: bool = False
    guest_shutdown: Literal["clean", "ignores", "none"] = "clean"
    shutdown_polls: int = 2
    shutdown_left: int | None = None


class SnapshotDiskState(_State):
    disk: str  # the VM disk's instance_id
    instance_id: str  # the snapshot's own SASD InstanceID
    path: str  # the frozen file (HostResource[0])
    freeze_seq: int  # the disk's seq when the checkpoint froze it
    rct_guid: str


class SnapshotState(_State):
    id: str
    vm_id: str
    name: str
    type: str
    created: str  # ISO 8601 with offset, as the scripts print `.ToString('o')`
    consistency_level: int
    disks: list[SnapshotDiskState]


class ReferencePointState(_State):
    id: str
    vm_id: str
    type: int
    consistency_level: int
    disk_ids: list[str]
    rct_ids: list[str]


class SwitchState(_State):
    name: str
    type: Literal["External", "Internal", "Private"]


class HostState(_State):
    name: str = "HV01"
    os_build: int = 17763
    supported_versions: list[str] = Field(
        default_factory=lambda: ["5.0", "6.2", "7.0", "7.1", "8.0", "8.1", "8.2", "8.3", "9.0"]
    )
    vms: list[VmState] = Field(default_factory=list)
    snapshots: list[SnapshotState] = Field(default_factory=list)
    reference_points: list[ReferencePointState] = Field(default_factory=list)
    switches: list[SwitchState] = Field(default_factory=lambda: [SwitchState(name="vSwitch", type="External")])


def windows_to_local(drives: Path, win_path: str) -> Path:
    """The local file standing for the Windows path `win_path` (`C:\\Hyper-V\\Virtual Hard Disks\\web01.vhdx`
    -> `<drives>/C/Hyper-V/Virtual Hard Disks/web01.vhdx`).

    Case-insensitive as NTFS is: each component matches an existing entry whatever its case (the existing
    spelling wins); components that do not exist yet keep the spelling given. Only absolute drive-letter
    paths are accepted; `..`, `.`, empty components, UNC and `\\\\?\\` paths, `/` and NUL are refused.
    """
    if not _DRIVE.match(win_path) or "/" in win_path or "\0" in win_path:
        raise ValueError(f"not an absolute drive-letter Windows path: {win_path!r}")
    parts = PureWindowsPath(win_path).parts[1:]
    raw = win_path[3:].split("\\")
    if any(p in ("", ".", "..") for p in raw) or len(raw) != len(parts):
        raise ValueError(f"refusing Windows path with empty, '.' or '..' components: {win_path!r}")
    here = drives / win_path[0].upper()
    for part in parts:
        here = here / _existing_name(here, part)
    return here


def _existing_name(folder: Path, name: str) -> str:
    try:
        entries = os.listdir(folder)
    except OSError:
        return name
    if name in entries:
        return name
    folded = name.casefold()
    return next((e for e in sorted(entries) if e.casefold() == folded), name)


def same_windows_path(a: str, b: str) -> bool:
    return a.casefold() == b.casefold()
