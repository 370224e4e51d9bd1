"""What each shipped script takes and prints: the contract between the scripts in `ps/`, the provider
that runs them, and the test stand-in that answers for a Hyper-V host.

Parameters travel as data: `Params` models serialised to JSON and handed to the script in the shell's
environment (see `winrm.py`), never written into the script's text. Results are the `result` of the script's
envelope (envelope.py), validated strictly: the scripts print flat objects with enums already turned into
their names (`.ToString()`, since 5.1 prints enums as integers whose numbers differ between builds) and dates
as ISO 8601 with an offset (`.ToString('o')`), and pass every list through `@(...)` with an explicit
`-Depth`; the models still accept 5.1's lone item for a list (`PsList`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from vmrepl.providers.hyperv.envelope import PsDateTime, PsList

# Msvm_VirtualSystemSettingData.VirtualSystemType of a recovery (backup) checkpoint, and of a user's.
RECOVERY_SNAPSHOT = "Microsoft:Hyper-V:Snapshot:Recovery"
# Msvm_VirtualSystemReferencePoint.ReferencePointType of an RCT reference point (read from instances:
# the method documentation numbers it differently, fact sheet 1.5).
RCT_REFERENCE_POINT = 2
# Msvm_VirtualSystemSnapshotSettingData.ConsistencyLevel / reference point ConsistencyLevel.
APPLICATION_CONSISTENT = 1
CRASH_CONSISTENT = 2
# Msvm_VirtualSystemSnapshotSettingData.GuestBackupType.
GUEST_BACKUP_FULL = 1
GUEST_BACKUP_COPY = 2
# Msvm_ComputerSystem.EnabledState (and RequestStateChange's RequestedState): Enabled = running, Disabled = off.
ENABLED_STATE_RUNNING = 2
ENABLED_STATE_OFF = 3
# Past any VM's memory (Hyper-V's largest is 240 TB, Windows Server 2022 generation 2) and within the [int64]
# the scripts cast to: a larger captured value is refused here, not by a cast on the host.
MAX_VM_MEMORY = 256 * 1024**4


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


# ---- parameters ----------------------------------------------------------------------------------


class NoParams(_Model):
    pass


class VmParams(_Model):
    # Msvm_ComputerSystem.Name (the VM's GUID), or the VM's name for `get_vm` only.
    vm: str = Field(min_length=1, max_length=256)


class CreateCheckpointParams(_Model):
    vm_id: str = Field(min_length=1, max_length=64)
    # The recovery checkpoint's ElementName: how vmrepl knows its own checkpoints (`vmrepl-...`).
    name: str = Field(min_length=1, max_length=100)
    consistency_level: Literal[1, 2]
    guest_backup_type: Literal[1, 2]
    timeout_seconds: int = Field(ge=1, le=86400)


class SnapshotParams(_Model):
    vm_id: str = Field(min_length=1, max_length=64)
    snapshot_id: str = Field(min_length=1, max_length=256)  # Msvm_VirtualSystemSettingData.InstanceID
    timeout_seconds: int = Field(ge=1, le=86400)


class ReferencePointParams(_Model):
    vm_id: str = Field(min_length=1, max_length=64)
    reference_point_id: str = Field(min_length=1, max_length=256)  # Msvm_VirtualSystemReferencePoint.InstanceID
    timeout_seconds: int = Field(ge=1, le=86400)


class VmTimeoutParams(_Model):
    vm_id: str = Field(min_length=1, max_length=64)
    timeout_seconds: int = Field(ge=1, le=86400)


class VmStateParams(_Model):
    vm_id: str = Field(min_length=1, max_length=64)
    # Msvm_ComputerSystem.RequestStateChange: 2 start (Enabled), 3 turn off (Disabled).
    requested_state: Literal[2, 3]
    timeout_seconds: int = Field(ge=1, le=86400)


class NewDisk(_Model):
    """A differencing VHDX the host makes over `parent`, attached at the slot the captured disk id names."""

    controller_type: Literal["SCSI", "IDE"]
    controller_number: int = Field(ge=0, le=3)
    controller_location: int = Field(ge=0, le=63)
    path: str = Field(min_length=4, max_length=32767)  # the differencing disk (in the VM's folder)
    parent: str = Field(min_length=4, max_length=32767)  # the image it is made over (VmDiskSpec.path)


class NewNic(_Model):
    name: str = Field(min_length=1, max_length=256)
    switch: str | None = Field(default=None, max_length=256)  # None: left disconnected
    mac: str | None = Field(default=None, pattern=r"^[0-9A-F]{12}$")  # None: a dynamic MAC
    vlan_id: int | None = Field(default=None, ge=1, le=4094)


class RegisterVmParams(_Model):
    name: str = Field(min_length=1, max_length=100)
    folder: str = Field(min_length=4, max_length=32767)  # where the configuration and differencing disks go
    # The VM's Notes while it is being made (`creating`), then once it is complete (`registered`): how
    # vmrepl finds its own VMs again, and tells a half-made one from a finished one.
    creating: str = Field(min_length=1, max_length=4000)
    registered: str = Field(min_length=1, max_length=4000)
    generation: Literal[1, 2]
    version: str = Field(max_length=16)  # configuration version; "" for the host's default
    secure_boot: bool
    secure_boot_template: str = Field(max_length=256)  # "" for the host's default
    tpm: bool
    processors: int = Field(ge=1, le=2048)
    memory_startup: int = Field(ge=1, le=MAX_VM_MEMORY)
    dynamic_memory: bool
    memory_minimum: int = Field(ge=0, le=MAX_VM_MEMORY)
    memory_maximum: int = Field(ge=0, le=MAX_VM_MEMORY)
    private_switch: str | None = Field(default=None, min_length=1, max_length=256)  # made (isolated)
    nics: list[NewNic] = Field(max_length=64)
    disks: list[NewDisk] = Field(max_length=256)
    timeout_seconds: int = Field(ge=1, le=86400)


class UnregisterVmParams(_Model):
    vm_id: str = Field(min_length=1, max_length=64)
    # The differencing disks the provider made for the VM, deleted after the VM is gone.
    delete_files: list[str] = Field(max_length=256)
    # The private switch it made (isolated), removed when no adapter uses it any more.
    private_switch: str | None = Field(default=None, min_length=1, max_length=256)
    timeout_seconds: int = Field(ge=1, le=86400)


class MergeDisk(_Model):
    controller_type: Literal["SCSI", "IDE"]
    controller_number: int = Field(ge=0, le=3)
    controller_location: int = Field(ge=0, le=63)
    path: str = Field(min_length=4, max_length=32767)  # the differencing disk, merged then deleted
    parent: str = Field(min_length=4, max_length=32767)  # the drive points here afterwards


class MergeDisksParams(_Model):
    vm_id: str = Field(min_length=1, max_length=64)
    disks: list[MergeDisk] = Field(max_length=256)
    timeout_seconds: int = Field(ge=1, le=86400)


class DiskChangesParams(_Model):
    path: str = Field(min_length=1, max_length=32767)  # the frozen disk (the snapshot's HostResource[0])
    limit_id: str = Field(min_length=1, max_length=1024)  # the earlier reference point's RCT id of this disk
    offset: int = Field(ge=0)
    length: int = Field(ge=1)  # the window this call covers; the script calls in `chunk` pieces
    chunk: int = Field(ge=1)
    max_ranges: int = Field(ge=1)  # the script returns early past this many ranges (output stays small)
    timeout_seconds: int = Field(ge=1, le=86400)


# ---- results -------------------------------------------------------------------------------------


class HostInfo(_Model):
    name: str  # the computer name
    os_version: str  # [Environment]::OSVersion.Version, "10.0.17763.0"
    os_build: int  # 14393 = Windows Server 2016, 17763 = 2019, 20348 = 2022, 26100 = 2025
    os_caption: str  # Win32_OperatingSystem.Caption
    hyperv_version: str  # Get-VMHost HyperVVersion... or the vmms.exe file version
    supported_versions: PsList[str]  # Get-VMHostSupportedVersion: the VM configuration versions


class Nic(_Model):
    name: str
    switch: str | None  # SwitchName; null when not connected
    mac: str
    dynamic_mac: bool
    vlan_id: int | None


class Disk(_Model):
    # The drive's Msvm_StorageAllocationSettingData InstanceID; reference points pair RCT ids with these
    # (VirtualDiskIdentifiers), never by position.
    instance_id: str
    controller_type: Literal["SCSI", "IDE"]
    controller_number: int = Field(ge=0)
    controller_location: int = Field(ge=0)
    path: str  # the file the VM writes now (an .avhdx while a checkpoint exists)
    format: Literal["VHD", "VHDX", "VHDSet"]  # Get-VHD VhdFormat.ToString()
    type: Literal["Fixed", "Dynamic", "Differencing"]  # Get-VHD VhdType.ToString()
    size: int = Field(ge=0)  # virtual size, bytes
    block_size: int = Field(ge=0)
    logical_sector_size: int = Field(ge=0)
    parent_chain: PsList[str]  # ParentPath upwards to the base disk; [] for a base disk


class Vm(_Model):
    id: str  # Msvm_ComputerSystem.Name: a GUID
    name: str
    state: str  # VMState.ToString(): Running, Off, Saved, Paused, ...
    # Msvm_ComputerSystem.EnabledState: what power decisions go by (2 running, 3 off; numbers WMI documents,
    # unlike the cmdlet's enum).
    enabled_state: int
    generation: int = Field(ge=1, le=2)
    version: str  # configuration version, "9.0"
    secure_boot: bool | None  # generation 2 only
    secure_boot_template: str | None
    tpm: bool | None
    processors: int = Field(ge=1)
    memory_startup: int = Field(ge=0)  # bytes
    dynamic_memory: bool
    memory_minimum: int = Field(ge=0)
    memory_maximum: int = Field(ge=0)
    checkpoint_type: str  # Disabled, Production, ProductionOnly, Standard
    notes: str
    nics: PsList[Nic]
    disks: PsList[Disk]
    # Disks a checkpoint cannot include (pass-through, virtual Fibre Channel): reported, never read.
    unsupported_disks: PsList[str]


class SnapshotDisk(_Model):
    instance_id: str  # the snapshot's SASD InstanceID
    path: str  # HostResource[0]: the frozen file the proxy reads
    size: int = Field(ge=0)  # virtual size (Get-VHD)


class Snapshot(_Model):
    id: str  # Msvm_VirtualSystemSettingData.InstanceID
    vm_id: str
    name: str  # ElementName
    type: str  # VirtualSystemType: RECOVERY_SNAPSHOT for vmrepl's
    created: PsDateTime  # CreationTime
    disks: PsList[SnapshotDisk]


class ReferencePoint(_Model):
    id: str  # InstanceID
    vm_id: str  # VirtualSystemIdentifier
    type: int  # ReferencePointType: RCT_REFERENCE_POINT
    consistency_level: int
    # Parallel arrays: VirtualDiskIdentifiers[i] is the disk whose RCT id is ResilientChangeTrackingIdentifiers[i].
    disk_ids: PsList[str]
    rct_ids: PsList[str]


class Removed(_Model):
    # False when there was nothing to remove (already gone): removal is idempotent.
    removed: bool


class Power(_Model):
    vm_id: str
    enabled_state: int  # Msvm_ComputerSystem.EnabledState after the call


class Merged(_Model):
    # The differencing disks merged into their parents by this call (those already merged are not listed).
    merged: PsList[str]


class ChangedRange(_Model):
    offset: int = Field(ge=0)
    length: int = Field(ge=1)


class DiskChanges(_Model):
    # The script covered [params.offset, params.offset + processed); the caller continues from there.
    processed: int = Field(ge=0)
    ranges: PsList[ChangedRange]
    # GetVirtualDiskChanges reported ProcessedByteLength 0: the script stopped rather than spin.
    stalled: bool
