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

from vmrepl.domain import Consistency, DiskFormat, PowerState
from vmrepl.errors import FailedPrecondition
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
    # What `vmrepl infra vms` shows besides the disks (Hyper-V: state, generation, configuration
    # version); empty where the provider has none. The whole configuration is `vm_configuration`.
    state: str = ""
    details: tuple[tuple[str, str], ...] = ()
    # What failover, planned failover and failback decide by (`state` is the host's own word for it).
    power: PowerState = PowerState.OTHER


@dataclass(frozen=True, slots=True)
class CheckpointRequest:
    """The consistency a session asks of a checkpoint: application-consistent (Hyper-V: the guest's VSS
    through the integration services) or crash-consistent; `required` refuses a crash-consistent fallback
    when the application-consistent attempt fails."""

    application: bool = False
    required: bool = False
    # Hyper-V GuestBackupType: a VSS copy backup (the guest's own backup history untouched) unless the
    # job wants the guest's logs truncated (a full VSS backup).
    truncate_logs: bool = False


CRASH_CONSISTENT = CheckpointRequest()


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
    consistency: Consistency = Consistency.CRASH
    # Why it is crash-consistent when application consistency was asked (empty otherwise).
    fallback_reason: str = ""

    def disk(self, disk_id: str) -> DiskInCheckpoint:
        for d in self.disks:
            if d.disk_id == disk_id:
                return d
        raise KeyError(disk_id)


@dataclass(frozen=True, slots=True)
class Untracked:
    """The host cannot say which ranges changed since a reference: the session compares digests instead,
    and shows `reason` (in its log, its statistics and the CLI)."""

    reason: str


@dataclass(frozen=True, slots=True)
class KeptReference:
    """What `keep_reference` made of a checkpoint whose disks were all read."""

    # The change-tracking reference kept with the restore point: later sessions ask changes since it.
    reference: str
    # True when keeping the reference removed the checkpoint (Hyper-V's ConvertToReferencePoint merges it).
    checkpoint_removed: bool


@dataclass(frozen=True, slots=True)
class VmDiskSpec:
    """One disk of a VM to register: the captured disk id names its slot (Hyper-V: `scsi0-1`, the controller
    and location it is attached at), `path` where the host finds the image."""

    disk_id: str
    # File host: relative to the VM's folder. Hyper-V: the host's path of the image the VM's own differencing
    # disk is made over (the provider creates that differencing disk in the VM's folder).
    path: str
    format: DiskFormat
    size: int


@dataclass(frozen=True, slots=True)
class NetworkMap:
    source_switch: str
    target_switch: str


@dataclass(frozen=True, slots=True)
class VmSpec:
    """A VM to register on a host from a restore point (failover, test failover, failback to a new place)."""

    name: str
    # Where the VM lives on the host. File host: the VM folder's name under the host folder (made by the
    # target agent's MountPoint, holding the disks). Hyper-V: the folder (host's path) for its configuration
    # and differencing disks.
    folder: str
    # The configuration captured with the point (Provider.vm_configuration of the source's provider; the
    # same provider kind reads it back). Empty: the provider's defaults (file host).
    configuration: bytes
    disks: tuple[VmDiskSpec, ...]
    networks: tuple[NetworkMap, ...] = ()
    # Test failover: every NIC on a private switch made for this VM alone (removed with it).
    isolated: bool = False


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
    async def create_checkpoint(self, vm_id: str, request: CheckpointRequest = CRASH_CONSISTENT) -> Checkpoint:
        """A consistent point in time of the VM's disks, marked as vmrepl's (so `list_checkpoints` finds it
        after a crash and never returns another tool's)."""

    @abc.abstractmethod
    async def list_checkpoints(self, vm_id: str) -> list[Checkpoint]:
        """Checkpoints that exist now (after a controller crash, to reconcile)."""

    @abc.abstractmethod
    async def changed_ranges(self, checkpoint: Checkpoint, disk_id: str, since: str) -> list[Extent] | Untracked:
        """Ranges of the disk written between reference `since` and the checkpoint; Untracked, with the
        reason, when the host cannot say (no change tracking, the reference is gone, the disk set changed,
        the method failed): the caller compares digests. Never raises for a host that cannot say."""

    @abc.abstractmethod
    async def remove_checkpoint(self, vm_id: str, checkpoint_id: str) -> None:
        """Remove the checkpoint, merging what was written meanwhile back into the disks. Idempotent."""

    async def keep_reference(self, checkpoint: Checkpoint) -> KeptReference:
        """Every disk of the checkpoint was read: keep what later sessions ask changes against, before the
        restore point is committed. Hyper-V converts the recovery checkpoint into a reference point, which
        removes the checkpoint; here the checkpoint's own reference serves and it stays until released."""
        return KeptReference(checkpoint.reference, checkpoint_removed=False)

    async def drop_reference(self, vm_id: str, reference: str) -> None:
        """Forget a reference `keep_reference` made, once no restore point needs it (Hyper-V:
        DestroyReferencePoint). Idempotent; references are never dropped before the newer point is
        committed. Nothing to do where references are only sequence numbers."""
        return None

    async def check_host(self) -> None:
        """Refuse a host sessions cannot replicate from, with the reason (Hyper-V: older than 2016)."""
        return None

    async def describe_host(self) -> tuple[tuple[str, str], ...]:
        """Facts about the host for `vmrepl infra vms` (Hyper-V: its Windows version and build, whether RCT
        is available); none where the provider has none."""
        return ()

    # ---- failover: VMs made, started and stopped (docs/failover.md) ----
    # Defaults refuse: a provider that cannot do a step says so, and the operation fails before any change.

    async def register_vm(self, spec: VmSpec) -> VmInfo:
        """Create the VM `spec` describes, powered off, and return it. Idempotent by `spec.folder`: a VM
        already registered there is returned as it is."""
        raise FailedPrecondition(f"{type(self).__name__} cannot register VMs")

    async def unregister_vm(self, vm_id: str) -> None:
        """Remove the VM (off) from the host, its disk images left to whoever made them (the target agent's
        mount). Idempotent: an unknown VM is gone already. Hyper-V also removes the VM's differencing disks
        and private switches it made."""
        raise FailedPrecondition(f"{type(self).__name__} cannot unregister VMs")

    async def start_vm(self, vm_id: str) -> None:
        """Power the VM on. Idempotent."""
        raise FailedPrecondition(f"{type(self).__name__} cannot start VMs")

    async def shutdown_vm(self, vm_id: str, *, wait_seconds: float) -> None:
        """Shut the guest down cleanly (Hyper-V: the shutdown integration service) and wait until it is off;
        DeadlineExceeded after `wait_seconds` (the VM left running). Idempotent."""
        raise FailedPrecondition(f"{type(self).__name__} cannot shut VMs down")

    async def stop_vm(self, vm_id: str) -> None:
        """Turn the VM off at once (as pulling the plug). Idempotent."""
        raise FailedPrecondition(f"{type(self).__name__} cannot stop VMs")

    async def merge_vm_disks(self, vm_id: str) -> None:
        """Permanent failover: merge the VM's differencing disks into their parents so the VM stands alone
        (Hyper-V: Msvm_ImageManagementService.MergeVirtualHardDisk, before the target's FlattenMount; file
        host: after FlattenMount, which merges the layers, the VM's manifest names each merged base, the plain
        image, instead of the layer descriptor). Idempotent."""
        return None
