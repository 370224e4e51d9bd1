"""The provider interface, shaped for Hyper-V.

A session asks a provider for a VM and its disks, captures its
configuration, creates a consistent checkpoint (Hyper-V: a recovery or
production checkpoint), gets where each disk is read in that checkpoint and
which ranges changed since a change-tracking reference (Hyper-V: RCT
`GetVirtualDiskChanges` against a reference point), and removes the
checkpoint when every disk is read. Every method is a coroutine: providers
talk to hosts over the network (WinRM for Hyper-V).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

from vmrepl.domain import DiskFormat
from vmrepl.extent import Extent


@dataclass(frozen=True, slots=True)
class DiskInfo:
    disk_id: str
    # Where the proxy reads the disk *outside* a checkpoint (for inventory and sizing).
    locator: str
    format: DiskFormat
    size: int


@dataclass(frozen=True, slots=True)
class VmInfo:
    vm_id: str
    name: str
    host: str
    disks: tuple[DiskInfo, ...]


@dataclass(frozen=True, slots=True)
class DiskInCheckpoint:
    disk_id: str
    # Where the proxy reads this disk as it was when the checkpoint was taken.
    locator: str
    format: DiskFormat
    size: int


@dataclass(frozen=True, slots=True)
class Checkpoint:
    checkpoint_id: str
    vm_id: str
    created_at: float
    # Change-tracking reference of this checkpoint: a later session asks for changes since it.
    reference: str
    disks: tuple[DiskInCheckpoint, ...] = field(default_factory=tuple)

    def disk(self, disk_id: str) -> DiskInCheckpoint:
        for d in self.disks:
            if d.disk_id == disk_id:
                return d
        raise KeyError(disk_id)


class Provider(abc.ABC):
    """One hypervisor host (or cluster) as the controller sees it."""

    @abc.abstractmethod
    async def list_vms(self) -> list[VmInfo]: ...

    @abc.abstractmethod
    async def get_vm(self, ref: str) -> VmInfo:
        """A VM by id or by name; NotFound if neither matches."""

    @abc.abstractmethod
    async def vm_configuration(self, vm_id: str) -> bytes:
        """The VM's configuration as the host stores it, kept with each restore point."""

    @abc.abstractmethod
    async def create_checkpoint(self, vm_id: str) -> Checkpoint: ...

    @abc.abstractmethod
    async def list_checkpoints(self, vm_id: str) -> list[Checkpoint]:
        """Checkpoints that exist now (after a controller crash, to reconcile)."""

    @abc.abstractmethod
    async def changed_ranges(self, checkpoint: Checkpoint, disk_id: str, since: str) -> list[Extent] | None:
        """Ranges of the disk written between reference `since` and the checkpoint; None when the host
        cannot say (no change tracking, or the reference is unknown): the caller compares digests."""

    @abc.abstractmethod
    async def remove_checkpoint(self, vm_id: str, checkpoint_id: str) -> None:
        """Remove the checkpoint, merging what was written meanwhile back into the disks. Idempotent."""
