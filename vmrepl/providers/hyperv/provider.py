"""The Hyper-V provider: a Windows Server 2016+ host, driven by the PowerShell scripts the package ships.

Every host call is one script (`scripts.SCRIPTS`) run through a `ScriptRunner` (winrm.py's client; a fake
in tests), which returns the script's validated result or raises `HostError` (the host refused, with its
operation and code) or `HostOutputError` (the host printed something else). What the provider adds is the
policy: which VMs and disks can be replicated, the checkpoint's consistency and its fallback, which
snapshots are vmrepl's, the reference string kept with restore points, and when a disk's changes cannot
be trusted (docs/hyperv.md, "The provider").
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel, ValidationError

from vmrepl.domain import Consistency, DiskFormat
from vmrepl.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    HostError,
    HostOutputError,
    InvalidArgument,
    NotFound,
    PathError,
    VmreplError,
)
from vmrepl.extent import Extent
from vmrepl.logs import get_logger
from vmrepl.names import check_name
from vmrepl.providers.base import (
    CRASH_CONSISTENT,
    Checkpoint,
    CheckpointRequest,
    DiskInCheckpoint,
    DiskInfo,
    KeptReference,
    Provider,
    Untracked,
    VmInfo,
    VmSpec,
)
from vmrepl.providers.hyperv import failover as fo
from vmrepl.providers.hyperv import models as m
from vmrepl.providers.hyperv import reference as rf
from vmrepl.providers.hyperv.changes import ChangeLimits, read_changes

log = get_logger("vmrepl.providers.hyperv")

GiB = 1024**3
# Windows Server 2016: the first build with RCT, recovery checkpoints and reference points.
MIN_OS_BUILD = 14393
CHECKPOINT_PREFIX = "vmrepl-"
T = TypeVar("T")
_FORMATS = {"VHDX": DiskFormat.VHDX, "VHD": DiskFormat.VHD}


class ScriptRunner(Protocol):
    async def run(self, name: str, params: BaseModel) -> Any:
        """The validated result of script `name` (`scripts.SCRIPTS[name].result`); HostError when the host
        refused, HostOutputError when its output is not one valid envelope."""


def disk_id_of(disk: m.Disk) -> str:
    """A stable plain name for a drive from its slot: `scsi0-1` is SCSI controller 0, location 1."""
    name = f"{disk.controller_type.lower()}{disk.controller_number}-{disk.controller_location}"
    return check_name("disk_id", name)


class HyperVProvider(Provider):
    def __init__(
        self,
        *,
        runner: ScriptRunner,
        host: str,
        checkpoint_prefix: str = CHECKPOINT_PREFIX,
        timeout_seconds: int = 3600,
        change_limits: ChangeLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        power_poll_seconds: float = 2.0,
    ) -> None:
        # Every vmrepl checkpoint starts with "vmrepl-", whatever the prefix adds: that is how a later run
        # (after a crash) tells its own recovery snapshots from another tool's.
        if not checkpoint_prefix.startswith(CHECKPOINT_PREFIX) or len(checkpoint_prefix) > 60:
            raise ValueError(f"checkpoint prefix {checkpoint_prefix!r} must start with {CHECKPOINT_PREFIX!r}")
        check_name("checkpoint_prefix", checkpoint_prefix)
        self._runner = runner
        self._host = host
        self._prefix = checkpoint_prefix
        self._timeout = timeout_seconds
        self._limits = change_limits or ChangeLimits()
        self._host_info: m.HostInfo | None = None
        self._left_alone: set[str] = set()
        # How shutdown_vm waits for the guest (a fake clock in tests).
        self._clock, self._sleep, self._poll = clock, sleep, power_poll_seconds

    # ---- host and inventory ------------------------------------------------------------------------

    async def host_info(self) -> m.HostInfo:
        if self._host_info is None:
            info = await self._runner.run("host_info", m.NoParams())
            self._host_info = _expect(info, m.HostInfo, self._host, "host_info")
        return self._host_info

    async def check_host(self) -> None:
        info = await self.host_info()
        if info.os_build < MIN_OS_BUILD:
            raise FailedPrecondition(
                f"host {self._host} runs {info.os_caption or 'Windows'} (build {info.os_build}): vmrepl needs"
                f" Windows Server 2016 (build {MIN_OS_BUILD}) or later for recovery checkpoints and RCT"
            )

    async def describe_host(self) -> tuple[tuple[str, str], ...]:
        info = await self.host_info()
        old = info.os_build < MIN_OS_BUILD
        return (
            ("name", info.name),
            ("windows", f"{info.os_caption} ({info.os_version}, build {info.os_build})"),
            ("hyperv", info.hyperv_version),
            ("vm_versions", ", ".join(info.supported_versions)),
            ("rct", "no: older than Windows Server 2016 (refused)" if old else "yes (for VHDX disks of VMs at 6.2+)"),
        )

    async def list_vms(self) -> list[VmInfo]:
        vms = _expect_list(await self._runner.run("list_vms", m.NoParams()), m.Vm, self._host, "list_vms")
        info = await self.host_info()
        return [self._vm_info(vm, info) for vm in vms]

    async def get_vm(self, ref: str) -> VmInfo:
        vm = await self._find_vm(ref)
        return self._vm_info(vm, await self.host_info())

    async def _find_vm(self, ref: str) -> m.Vm:
        """The one VM whose id (without case) or name is `ref`; NotFound, or refused when a name is ambiguous."""
        raw = await self._runner.run("get_vm", _params(m.VmParams, vm=ref))
        found = _expect_list(raw, m.Vm, self._host, "get_vm")
        by_id = [vm for vm in found if vm.id.lower() == ref.lower()]
        by_name = [vm for vm in found if vm.name.casefold() == ref.casefold()]
        stray = [vm.id for vm in found if vm not in by_id and vm not in by_name]
        if stray:
            raise HostOutputError(f"{self._host}: get_vm for {ref!r} returned VMs that do not match: {stray}")
        if by_id:
            return by_id[0]
        if not by_name:
            raise NotFound(f"host {self._host} has no VM with id or name {ref!r}")
        if len(by_name) > 1:
            ids = ", ".join(vm.id for vm in by_name)
            raise FailedPrecondition(
                f"host {self._host} has {len(by_name)} VMs named {ref!r} (ids {ids}): name the VM by its id"
            )
        return by_name[0]

    async def _vm_by_id(self, vm_id: str) -> m.Vm:
        vm = await self._find_vm(vm_id)
        if vm.id.lower() != vm_id.lower():
            # A checkpoint or a reference is about one VM: a name that happens to equal the id is not it.
            raise NotFound(f"host {self._host} has no VM with id {vm_id!r}")
        return vm

    def _vm_info(self, vm: m.Vm, info: m.HostInfo) -> VmInfo:
        ids = _disk_ids(vm, self._host)
        disks = tuple(
            DiskInfo(disk_id=ids[d.instance_id], locator=d.path, format=_FORMATS[d.format], size=d.size)
            for d in vm.disks
            if d.format in _FORMATS
        )
        details = _details(vm, info, ids)
        return VmInfo(
            vm_id=vm.id,
            name=vm.name,
            host=self._host,
            disks=disks,
            state=vm.state,
            details=details,
            power=fo.power_of(vm.enabled_state),
        )

    async def vm_configuration(self, vm_id: str) -> bytes:
        vm = await self._vm_by_id(vm_id)
        doc = _configuration(vm, await self.host_info(), _disk_ids(vm, self._host))
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    # ---- checkpoints -------------------------------------------------------------------------------

    async def create_checkpoint(self, vm_id: str, request: CheckpointRequest = CRASH_CONSISTENT) -> Checkpoint:
        await self.check_host()
        vm = await self._vm_by_id(vm_id)
        self._refuse_uncheckpointable(vm)
        guest = m.GUEST_BACKUP_FULL if request.truncate_logs else m.GUEST_BACKUP_COPY
        fallback = ""
        if request.application:
            try:
                snap = await self._create(vm.id, self._checkpoint_name(), m.APPLICATION_CONSISTENT, guest)
                return await self._checkpoint_of(vm, snap, Consistency.APPLICATION, "")
            except HostError as e:
                if request.required:
                    raise HostError(
                        host=e.host,
                        operation=e.operation,
                        message=f"application-consistent checkpoint required by the job: {e.description}",
                        code=e.code,
                    ) from e
                fallback = _host_reason(e)
                log.warning("application_checkpoint_failed", host=self._host, vm_id=vm.id, reason=fallback)
        snap = await self._create(vm.id, self._checkpoint_name(), m.CRASH_CONSISTENT, guest)
        return await self._checkpoint_of(vm, snap, Consistency.CRASH, fallback)

    def _checkpoint_name(self) -> str:
        # A new name per attempt: a failed attempt the host completes later (a WMI job past our timeout) is a
        # separate leftover, found and removed by the next session like any other.
        return f"{self._prefix}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"

    def _refuse_uncheckpointable(self, vm: m.Vm) -> None:
        """Refuse, before the host is asked, a VM whose checkpoint would leave disks out or unreadable."""
        ids = _disk_ids(vm, self._host)
        problems = [f"{d}: pass-through or other disk a checkpoint cannot include" for d in vm.unsupported_disks]
        problems += [
            f"{ids[d.instance_id]}: VHD Set (.vhds), which vmrepl cannot read" for d in vm.disks if d.format == "VHDSet"
        ]
        if not vm.disks and not problems:
            problems.append("the VM has no virtual hard disk")
        if problems:
            raise FailedPrecondition(
                f"VM {vm.name} ({vm.id}) on host {self._host} cannot be replicated: " + "; ".join(problems)
            )

    async def _create(self, vm_id: str, name: str, level: int, guest: int) -> m.Snapshot:
        params = _params(
            m.CreateCheckpointParams,
            vm_id=vm_id,
            name=name,
            consistency_level=1 if level == m.APPLICATION_CONSISTENT else 2,
            guest_backup_type=1 if guest == m.GUEST_BACKUP_FULL else 2,
            timeout_seconds=self._timeout,
        )
        snap = _expect(await self._runner.run("create_checkpoint", params), m.Snapshot, self._host, "create_checkpoint")
        if snap.vm_id.lower() != vm_id.lower() or snap.type != m.RECOVERY_SNAPSHOT or snap.name != name:
            await self._remove_quietly(vm_id, snap.id)
            raise HostOutputError(
                f"{self._host}: create_checkpoint returned snapshot {snap.id!r} ({snap.type}, {snap.name!r}"
                f" of VM {snap.vm_id}), not the recovery checkpoint {name!r} of VM {vm_id}"
            )
        return snap

    async def _checkpoint_of(self, vm: m.Vm, snap: m.Snapshot, consistency: Consistency, reason: str) -> Checkpoint:
        try:
            disks = _frozen_disks(vm, snap, self._host, strict=True)
        except HostOutputError:
            # Nobody else knows this checkpoint yet: leaving it would pile up AVHDX files until the next run.
            await self._remove_quietly(vm.id, snap.id)
            raise
        return Checkpoint(
            checkpoint_id=checkpoint_name(snap.id, self._host),
            vm_id=vm.id,
            created_at=snap.created.timestamp(),
            reference="",
            disks=disks,
            consistency=consistency,
            fallback_reason=reason,
        )

    async def _remove_quietly(self, vm_id: str, snapshot_id: str) -> None:  # an InstanceID
        try:
            await self._runner.run("remove_checkpoint", self._snapshot_params(vm_id, snapshot_id))
        except VmreplError as e:
            log.warning(
                "checkpoint_cleanup_failed", host=self._host, vm_id=vm_id, checkpoint_id=snapshot_id, error=str(e)
            )

    def _snapshot_params(self, vm_id: str, snapshot_id: str) -> m.SnapshotParams:
        return _params(m.SnapshotParams, vm_id=vm_id, snapshot_id=snapshot_id, timeout_seconds=self._timeout)

    async def _snapshots(self, vm_id: str) -> tuple[list[m.Snapshot], list[m.Snapshot]]:
        """The VM's snapshots: vmrepl's recovery checkpoints, and the others (logged once, never touched)."""
        raw = await self._runner.run("list_checkpoints", _params(m.VmParams, vm=vm_id))
        ours: list[m.Snapshot] = []
        others: list[m.Snapshot] = []
        for snap in _expect_list(raw, m.Snapshot, self._host, "list_checkpoints"):
            if snap.type == m.RECOVERY_SNAPSHOT and snap.name.startswith(self._prefix):
                ours.append(snap)
                continue
            others.append(snap)
            if snap.id not in self._left_alone:
                self._left_alone.add(snap.id)
                log.info(
                    "checkpoint_not_vmrepls_left_alone",
                    host=self._host,
                    vm_id=vm_id,
                    checkpoint_id=snap.id,
                    name=snap.name,
                    type=snap.type,
                )
        return ours, others

    async def list_checkpoints(self, vm_id: str) -> list[Checkpoint]:
        ours, _ = await self._snapshots(vm_id)
        if not ours:
            return []
        vm = await self._vm_by_id(vm_id)
        # Which consistency a listed checkpoint has is not on the snapshot: the session recorded it when it
        # took it. A disk the VM no longer has is left out (logged) so that the checkpoint can still be removed.
        return [
            Checkpoint(
                checkpoint_id=checkpoint_name(snap.id, self._host),
                vm_id=vm.id,
                created_at=snap.created.timestamp(),
                reference="",
                disks=_frozen_disks(vm, snap, self._host, strict=False),
            )
            for snap in ours
        ]

    async def remove_checkpoint(self, vm_id: str, checkpoint_id: str) -> None:
        # DestroySnapshot merges the AVHDX into its parent and is what Hyper-V documents for any snapshot.
        # nxmBackup's convert-then-destroy would create a reference point first (an extra object a crash in
        # between leaves behind) and gains nothing here, since recovery snapshots destroy normally.
        ours, others = await self._snapshots(vm_id)
        instance = snapshot_instance(checkpoint_id)
        if any(s.id.casefold() == instance.casefold() for s in others):
            raise FailedPrecondition(
                f"checkpoint {checkpoint_id} of VM {vm_id} on host {self._host} is not vmrepl's: left alone"
            )
        if not any(s.id.casefold() == instance.casefold() for s in ours):
            return
        removed = await self._runner.run("remove_checkpoint", self._snapshot_params(vm_id, instance))
        _expect(removed, m.Removed, self._host, "remove_checkpoint")

    # ---- reference points and changes --------------------------------------------------------------

    async def keep_reference(self, checkpoint: Checkpoint) -> KeptReference:
        # The VM's drives are read before the conversion: once converted, a failure here would leave a
        # reference point no restore point names, and nothing would ever destroy it.
        vm = await self._vm_by_id(checkpoint.vm_id)
        params = self._snapshot_params(checkpoint.vm_id, snapshot_instance(checkpoint.checkpoint_id))
        rp = _expect(
            await self._runner.run("convert_checkpoint", params), m.ReferencePoint, self._host, "convert_checkpoint"
        )
        ref = _reference_of(rp, vm, checkpoint, self._host)
        log.info(
            "reference_point_kept",
            host=self._host,
            vm_id=checkpoint.vm_id,
            reference_point=rp.id,
            disks_tracked=sorted(ref.disks),
        )
        return KeptReference(reference=_encode_bounded(ref), checkpoint_removed=True)

    async def drop_reference(self, vm_id: str, reference: str) -> None:
        try:
            ref = rf.parse(reference)
        except rf.BadReference as e:
            log.warning("reference_not_dropped", host=self._host, vm_id=vm_id, reason=str(e))
            return
        if ref.vm_id.lower() != vm_id.lower():
            log.warning("reference_not_dropped", host=self._host, vm_id=vm_id, reason=f"it is VM {ref.vm_id}'s")
            return
        params = _params(
            m.ReferencePointParams,
            vm_id=vm_id,
            reference_point_id=ref.reference_point_id,
            timeout_seconds=self._timeout,
        )
        _expect(
            await self._runner.run("destroy_reference_point", params), m.Removed, self._host, "destroy_reference_point"
        )

    async def changed_ranges(self, checkpoint: Checkpoint, disk_id: str, since: str) -> list[Extent] | Untracked:
        try:
            return await self._changed_ranges(checkpoint, disk_id, since)
        except (HostError, HostOutputError) as e:
            text = _host_reason(e) if isinstance(e, HostError) else str(e)
            return Untracked(f"the host could not list the changes of disk {disk_id}: {text}")

    async def _changed_ranges(self, cp: Checkpoint, disk_id: str, since: str) -> list[Extent] | Untracked:
        try:
            ref = rf.parse(since)
        except rf.BadReference as e:
            return Untracked(f"RCT reference unreadable: {e}")
        if ref.vm_id.lower() != cp.vm_id.lower():
            return Untracked(f"the RCT reference is VM {ref.vm_id}'s, not this VM's ({cp.vm_id})")
        info = await self.host_info()
        if info.os_build < MIN_OS_BUILD:
            return Untracked(f"host {self._host} is older than Windows Server 2016 (build {info.os_build}): no RCT")
        disk = next((d for d in cp.disks if d.disk_id == disk_id), None)
        if disk is None:
            return Untracked(f"disk {disk_id} is not in checkpoint {cp.checkpoint_id}")
        if disk.format is not DiskFormat.VHDX:
            return Untracked(f"disk {disk_id} is a {disk.format.value.upper()} file, not VHDX: RCT tracks VHDX only")
        tracked = ref.disks.get(disk_id)
        if tracked is None:
            return Untracked(
                f"the reference point kept no RCT id for disk {disk_id} (RCT was unavailable for it, or the"
                " VM's disk set changed since)"
            )
        if tracked.size != disk.size:
            return Untracked(f"disk {disk_id} changed size since the reference ({tracked.size} -> {disk.size} bytes)")
        points = await self._runner.run("list_reference_points", _params(m.VmParams, vm=cp.vm_id))
        if not any(
            p.id == ref.reference_point_id
            for p in _expect_list(points, m.ReferencePoint, self._host, "list_reference_points")
        ):
            return Untracked(f"reference point {ref.reference_point_id} is gone from host {self._host}")
        return await read_changes(
            self._runner, disk=disk, limit_id=tracked.rct_id, limits=self._limits, timeout_seconds=self._timeout
        )

    # ---- failover: VMs made, started and stopped (docs/hyperv.md, "Failover on Hyper-V") ------------

    async def register_vm(self, spec: VmSpec) -> VmInfo:
        await self.check_host()
        info = await self.host_info()
        plan = fo.plan(spec, info, timeout_seconds=self._timeout)
        for vm, note in await self._own_vms(spec.name, plan.note.folder):
            if note.state == "registered":
                return self._registered(vm, info, plan)
            # A call cut short left it half made: removed, with what was made for it, then made again.
            log.warning("half_registered_vm_removed", host=self._host, vm_id=vm.id, name=vm.name)
            await self._remove_vm(vm.id, fo.Note(note.folder, note.state, plan.note.disks, note.switch))
        made = _expect(await self._runner.run("register_vm", plan.params), m.Vm, self._host, "register_vm")
        _check_made(made, spec.name, plan, self._host)
        if plan.disconnected:
            log.warning("failover_nics_disconnected", host=self._host, vm_id=made.id, nics=list(plan.disconnected))
        return self._registered(made, info, plan)

    def _registered(self, vm: m.Vm, info: m.HostInfo, plan: fo.Plan) -> VmInfo:
        base = self._vm_info(vm, info)
        return VmInfo(
            vm_id=base.vm_id,
            name=base.name,
            host=base.host,
            disks=base.disks,
            state=base.state,
            details=base.details + fo.details(plan),
            power=base.power,
        )

    async def _own_vms(self, name: str, folder: str) -> list[tuple[m.Vm, fo.Note]]:
        """The VMs named `name` that vmrepl made for `folder` (any other VM of that name is not vmrepl's)."""
        found = _expect_list(await self._runner.run("get_vm", _params(m.VmParams, vm=name)), m.Vm, self._host, "get_vm")
        out = []
        for vm in found:
            note = fo.parse_note(vm.notes)
            if vm.name.casefold() == name.casefold() and note is not None and fo.same_path(note.folder, folder):
                out.append((vm, note))
        return out

    async def _vm_or_none(self, vm_id: str) -> m.Vm | None:
        try:
            return await self._vm_by_id(vm_id)
        except NotFound:
            return None

    async def _own_vm(self, vm_id: str, what: str) -> tuple[m.Vm, fo.Note] | None:
        vm = await self._vm_or_none(vm_id)
        if vm is None:
            return None
        note = fo.parse_note(vm.notes)
        if note is None:
            raise FailedPrecondition(
                f"VM {vm.name} ({vm.id}) on host {self._host} was not registered by vmrepl: {what} left it alone"
            )
        return vm, note

    async def unregister_vm(self, vm_id: str) -> None:
        own = await self._own_vm(vm_id, "unregister_vm")
        if own is not None:
            await self._remove_vm(own[0].id, own[1])

    async def _remove_vm(self, vm_id: str, note: fo.Note) -> None:
        params = _params(
            m.UnregisterVmParams,
            vm_id=vm_id,
            delete_files=list(note.disks),
            private_switch=note.switch,
            timeout_seconds=self._timeout,
        )
        _expect(await self._runner.run("unregister_vm", params), m.Removed, self._host, "unregister_vm")

    async def _change_state(self, vm_id: str, state: int) -> m.Power:
        params = _params(m.VmStateParams, vm_id=vm_id, requested_state=state, timeout_seconds=self._timeout)
        return self._power_of(vm_id, await self._runner.run("change_vm_state", params), "change_vm_state")

    def _power_of(self, vm_id: str, value: object, script: str) -> m.Power:
        """The script's power answer, refused when it is about another VM (a power decision on its word would
        be about the wrong VM)."""
        power = _expect(value, m.Power, self._host, script)
        if power.vm_id.lower() != vm_id.lower():
            raise HostOutputError(f"{self._host}: {script} for VM {vm_id} answered about another VM ({power.vm_id})")
        return power

    async def start_vm(self, vm_id: str) -> None:
        power = await self._change_state(vm_id, m.ENABLED_STATE_RUNNING)
        if power.enabled_state != m.ENABLED_STATE_RUNNING:
            raise HostOutputError(f"{self._host}: VM {vm_id} is in EnabledState {power.enabled_state} after starting")

    async def stop_vm(self, vm_id: str) -> None:
        power = await self._change_state(vm_id, m.ENABLED_STATE_OFF)
        if power.enabled_state != m.ENABLED_STATE_OFF:
            raise HostOutputError(
                f"{self._host}: VM {vm_id} is in EnabledState {power.enabled_state} after turning off"
            )

    async def shutdown_vm(self, vm_id: str, *, wait_seconds: float) -> None:
        """InitiateShutdown through the guest's shutdown integration service, then EnabledState polled until
        off; DeadlineExceeded after `wait_seconds` with the VM left as it is."""
        deadline = self._clock() + wait_seconds
        params = _params(m.VmTimeoutParams, vm_id=vm_id, timeout_seconds=self._timeout)
        power = self._power_of(vm_id, await self._runner.run("shutdown_vm", params), "shutdown_vm")
        while power.enabled_state != m.ENABLED_STATE_OFF:
            left = deadline - self._clock()
            if left <= 0:
                raise DeadlineExceeded(
                    f"VM {vm_id} on host {self._host} was asked to shut down but is not off after {wait_seconds:g} s"
                    f" (EnabledState {power.enabled_state}): the guest did not shut down in time"
                )
            await self._sleep(min(self._poll, left))
            raw = await self._runner.run("vm_power", _params(m.VmParams, vm=vm_id))
            power = self._power_of(vm_id, raw, "vm_power")

    async def merge_vm_disks(self, vm_id: str) -> None:
        own = await self._own_vm(vm_id, "merge_vm_disks")
        if own is None:
            raise NotFound(f"host {self._host} has no VM with id {vm_id!r}")
        vm, note = own
        disks = [_merge_disk(d) for d in vm.disks if any(fo.same_path(d.path, p) for p in note.disks)]
        if not disks:
            return
        if vm.enabled_state != m.ENABLED_STATE_OFF:
            raise FailedPrecondition(
                f"VM {vm.name} ({vm.id}) on host {self._host} is {vm.state}: Hyper-V merges a differencing disk only"
                " while its VM is off (stop or shut it down first)"
            )
        params = _params(m.MergeDisksParams, vm_id=vm.id, disks=disks, timeout_seconds=self._timeout)
        merged = _expect(await self._runner.run("merge_vm_disks", params), m.Merged, self._host, "merge_vm_disks")
        log.info("failover_disks_merged", host=self._host, vm_id=vm.id, merged=list(merged.merged))


# ---- pure helpers ------------------------------------------------------------------------------------


P = TypeVar("P", bound=BaseModel)


def _params(model: type[P], **values: Any) -> P:
    """A script's parameters; a value out of the script's bounds (an id too long) is refused as an argument."""
    try:
        return model(**values)
    except ValidationError as e:
        err = e.errors()[0]
        raise InvalidArgument(".".join(str(p) for p in err["loc"]) or model.__name__, err["msg"]) from None


_GUID = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}")


def _check_made(made: m.Vm, name: str, plan: fo.Plan, host: str) -> None:
    """register_vm's answer is the VM asked for: a VM id, the name, the note, and each differencing disk at
    its slot (a VM said to be made without its disks would be started as the failed-over VM)."""
    slots = {(d.controller_type, d.controller_number, d.controller_location): d.path for d in made.disks}
    disks_ok = all(
        fo.same_path(slots.get((d.controller_type, d.controller_number, d.controller_location), ""), d.path)
        for d in plan.params.disks
    )
    if not _GUID.fullmatch(made.id) or made.name != name or fo.parse_note(made.notes) != plan.note or not disks_ok:
        raise HostOutputError(
            f"{host}: register_vm returned VM {made.id[:64]!r} ({made.name[:100]!r}), not the one asked for"
        )


def _merge_disk(d: m.Disk) -> m.MergeDisk:
    if d.type != "Differencing" or not d.parent_chain:
        raise HostOutputError(f"the drive {d.path} vmrepl made as a differencing disk is {d.type} without a parent")
    return m.MergeDisk(
        controller_type=d.controller_type,
        controller_number=d.controller_number,
        controller_location=d.controller_location,
        path=d.path,
        parent=d.parent_chain[0],
    )


def _expect(value: object, kind: type[T], host: str, script: str) -> T:
    """The runner's result, refused when it is not what the script's contract says (a runner bug)."""
    if not isinstance(value, kind):
        raise HostOutputError(f"{host}: {script} gave {type(value).__name__}, not {kind.__name__}")
    return value


def _expect_list(value: object, kind: type[T], host: str, script: str) -> list[T]:
    if not isinstance(value, list) or not all(isinstance(v, kind) for v in value):
        raise HostOutputError(f"{host}: {script} gave {type(value).__name__}, not a list of {kind.__name__}")
    return [v for v in value if isinstance(v, kind)]


def _host_reason(e: HostError) -> str:
    return e.description + (f" (code {e.code})" if e.code is not None else "") + f" [{e.operation}]"


def _disk_ids(vm: m.Vm, host: str) -> dict[str, str]:
    """InstanceID -> disk_id for each drive; two drives in one slot is host output vmrepl cannot trust."""
    out: dict[str, str] = {}
    for d in vm.disks:
        try:
            name = disk_id_of(d)
        except PathError as e:
            raise HostOutputError(f"{host}: VM {vm.id} has a drive vmrepl cannot name: {e}") from None
        if name in out.values() or d.instance_id in out:
            raise HostOutputError(f"{host}: VM {vm.id} lists two drives at {name} ({d.instance_id})")
        out[d.instance_id] = name
    return out


def _frozen_disks(vm: m.Vm, snap: m.Snapshot, host: str, *, strict: bool) -> tuple[DiskInCheckpoint, ...]:
    """The checkpoint's frozen file of each VM drive, paired by InstanceID (never by position).

    strict (a checkpoint just taken): every drive must pair with exactly one snapshot disk. Otherwise (a
    listed checkpoint, perhaps from before a disk was added or removed) unpaired drives are left out."""
    ids = _disk_ids(vm, host)
    drives = [d for d in vm.disks if d.format in _FORMATS]
    paired = rf.pair([s.instance_id for s in snap.disks], drives, key=lambda d: d.instance_id)
    by_drive: dict[str, m.SnapshotDisk] = {}
    for s in snap.disks:
        drive = paired.get(s.instance_id)
        if drive is not None and drive.instance_id in by_drive:
            raise HostOutputError(f"{host}: checkpoint {snap.id} lists drive {ids[drive.instance_id]} twice")
        if drive is not None:
            by_drive[drive.instance_id] = s
    missing = [ids[d.instance_id] for d in drives if d.instance_id not in by_drive]
    strays = [s.instance_id for s in snap.disks if s.instance_id not in paired]
    if strict and (missing or strays):
        raise HostOutputError(
            f"{host}: checkpoint {snap.id} of VM {vm.id} does not match the VM's drives"
            f" (drives without a frozen disk: {missing or 'none'}; frozen disks of no drive: {strays or 'none'})"
        )
    if missing or strays:
        log.warning("checkpoint_disks_unpaired", host=host, checkpoint_id=snap.id, missing=missing, strays=strays)
    return tuple(
        DiskInCheckpoint(
            disk_id=ids[d.instance_id],
            locator=by_drive[d.instance_id].path,
            format=_FORMATS[d.format],
            size=by_drive[d.instance_id].size,
        )
        for d in drives
        if d.instance_id in by_drive
    )


def _reference_of(rp: m.ReferencePoint, vm: m.Vm, cp: Checkpoint, host: str) -> rf.RctReference:
    """What the reference string keeps: each disk's RCT id, paired through VirtualDiskIdentifiers.

    Never raises: the checkpoint is already converted, and a reference that names the point (even with no
    disk) is what lets `drop_reference` destroy it later. What is left out falls back to digests."""
    disks: dict[str, rf.RctDisk] = {}
    problems: list[str] = []
    if rp.vm_id.lower() != cp.vm_id.lower():
        problems.append(f"the reference point is VM {rp.vm_id}'s")
    elif rp.type != m.RCT_REFERENCE_POINT:
        problems.append(f"reference point type {rp.type} is not RCT ({m.RCT_REFERENCE_POINT})")
    elif len(rp.disk_ids) != len(rp.rct_ids):
        problems.append(f"{len(rp.disk_ids)} disk identifiers but {len(rp.rct_ids)} RCT ids")
    else:
        ids = _disk_ids(vm, host)
        rct_of = dict(zip(rp.disk_ids, rp.rct_ids, strict=True))
        drives = rf.pair(rp.disk_ids, vm.disks, key=lambda d: d.instance_id)
        for iid, drive in drives.items():
            disk_id = ids[drive.instance_id]
            frozen = next((d for d in cp.disks if d.disk_id == disk_id), None)
            rct_id = rct_of[iid]
            if frozen is None or not rct_id or len(rct_id) > 256 or disk_id in disks:
                problems.append(f"no usable RCT id for {disk_id}")
                continue
            disks[disk_id] = rf.RctDisk(rct_id=rct_id, size=frozen.size)
        problems += [f"no RCT id for {d.disk_id}" for d in cp.disks if d.disk_id not in disks]
    if problems:
        log.warning("reference_point_partial", host=host, vm_id=cp.vm_id, reference_point=rp.id, problems=problems)
    return rf.RctReference(reference_point_id=rp.id, vm_id=cp.vm_id, disks=disks)


def _encode_bounded(ref: rf.RctReference) -> str:
    """The reference string, within REFERENCE_LIMIT: the disks that do not fit are left out (logged)."""
    disks = dict(ref.disks)
    while True:
        text = rf.encode(rf.RctReference(ref.reference_point_id, ref.vm_id, disks))
        if len(text.encode("utf-8")) <= rf.REFERENCE_LIMIT or not disks:
            return text
        dropped = sorted(disks)[-1]
        del disks[dropped]
        log.warning("rct_id_not_kept", vm_id=ref.vm_id, disk_id=dropped, reason="the reference string is full")


def _version(text: str) -> tuple[int, ...] | None:
    try:
        return tuple(int(p) for p in text.split("."))
    except ValueError:
        return None


def _rct_status(vm: m.Vm, info: m.HostInfo, ids: dict[str, str]) -> str:
    """Whether RCT can be expected for the VM (the fact sheet 1.10: sources disagree below 8.0, so say so)."""
    if info.os_build < MIN_OS_BUILD:
        return f"no: host older than Windows Server 2016 (build {info.os_build})"
    version = _version(vm.version)
    if version is not None and version < (6, 2):
        return f"no: configuration version {vm.version} is below 6.2"
    vhd = [ids[d.instance_id] for d in vm.disks if d.format != "VHDX"]
    suffix = f"; not for {', '.join(vhd)} (not VHDX)" if vhd else ""
    if version is None or version < (8, 0):
        return f"uncertain: configuration version {vm.version} is below 8.0 (tried; digests if it fails){suffix}"
    return "yes" + suffix


def _mib(n: int) -> str:
    return f"{n // (1024 * 1024)} MiB"


def _details(vm: m.Vm, info: m.HostInfo, ids: dict[str, str]) -> tuple[tuple[str, str], ...]:
    memory = _mib(vm.memory_startup)
    if vm.dynamic_memory:
        memory += f" (dynamic {_mib(vm.memory_minimum)}..{_mib(vm.memory_maximum)})"
    secure = "n/a" if vm.secure_boot is None else ("on" if vm.secure_boot else "off")
    if vm.secure_boot and vm.secure_boot_template:
        secure += f" ({vm.secure_boot_template})"
    nics = "; ".join(f"{n.name}: {n.switch or 'not connected'} {n.mac}" for n in vm.nics)
    out = [
        ("generation", str(vm.generation)),
        ("version", vm.version),
        ("secure_boot", secure),
        ("tpm", "n/a" if vm.tpm is None else ("yes" if vm.tpm else "no")),
        ("processors", str(vm.processors)),
        ("memory", memory),
        ("nics", nics or "none"),
        ("checkpoint_type", vm.checkpoint_type),
        ("rct", _rct_status(vm, info, ids)),
    ]
    unreadable = [f"{ids[d.instance_id]} (VHD Set)" for d in vm.disks if d.format not in _FORMATS]
    unreadable += [f"{u} (pass-through or not checkpointable)" for u in vm.unsupported_disks]
    if unreadable:
        out.append(("unreadable_disks", ", ".join(unreadable)))
    return tuple(out)


def _base_file(disk: m.Disk) -> str:
    """The file name of the drive's base disk (the live path is an .avhdx while a checkpoint exists)."""
    path = disk.parent_chain[-1] if disk.parent_chain else disk.path
    return path.replace("/", "\\").rsplit("\\", 1)[-1]


def _configuration(vm: m.Vm, info: m.HostInfo, ids: dict[str, str]) -> dict[str, Any]:
    """What failover needs to register the replica VM like the source (docs/hyperv.md, "VM configuration")."""
    disks: Sequence[m.Disk] = sorted(
        vm.disks, key=lambda d: (d.controller_type, d.controller_number, d.controller_location)
    )
    return {
        "schema": "vmrepl.hyperv.vm/1",
        "vm": {
            "id": vm.id,
            "name": vm.name,
            "generation": vm.generation,
            "version": vm.version,
            "firmware": {"secure_boot": vm.secure_boot, "secure_boot_template": vm.secure_boot_template},
            "tpm": vm.tpm,
            "processors": vm.processors,
            "memory": {
                "startup": vm.memory_startup,
                "dynamic": vm.dynamic_memory,
                "minimum": vm.memory_minimum,
                "maximum": vm.memory_maximum,
            },
            "checkpoint_type": vm.checkpoint_type,
            # No notes: administrators keep passwords there, and restore points are shown to readers.
            "nics": [
                {"name": n.name, "switch": n.switch, "mac": n.mac, "dynamic_mac": n.dynamic_mac, "vlan_id": n.vlan_id}
                for n in sorted(vm.nics, key=lambda n: (n.name, n.mac))
            ],
            "disks": [
                {
                    "disk_id": ids[d.instance_id],
                    "controller_type": d.controller_type,
                    "controller_number": d.controller_number,
                    "controller_location": d.controller_location,
                    "file_name": _base_file(d),
                    "format": d.format,
                    "type": d.type,
                    "size": d.size,
                    "block_size": d.block_size,
                    "logical_sector_size": d.logical_sector_size,
                }
                for d in disks
            ],
            "unsupported_disks": sorted(vm.unsupported_disks),
        },
        "host": {
            "name": info.name,
            "os_version": info.os_version,
            "os_build": info.os_build,
            "os_caption": info.os_caption,
            "hyperv_version": info.hyperv_version,
            "supported_versions": sorted(info.supported_versions),
        },
    }


_SNAPSHOT_INSTANCE = re.compile(
    r"Microsoft:([0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12})"
)


def checkpoint_name(instance_id: str, host: str) -> str:
    """A snapshot's InstanceID (`Microsoft:<GUID>`) as the checkpoint id sessions, tickets and the target
    carry, which must be a plain name: the GUID. Anything else from the host is refused, not guessed at."""
    match = _SNAPSHOT_INSTANCE.fullmatch(instance_id)
    if match is None:
        raise HostOutputError(f"{host}: snapshot InstanceID {instance_id!r} is not Microsoft:<GUID>")
    return match.group(1).upper()


def snapshot_instance(checkpoint_id: str) -> str:
    """The snapshot's InstanceID for a checkpoint id `checkpoint_name` made."""
    return f"Microsoft:{checkpoint_id}"
