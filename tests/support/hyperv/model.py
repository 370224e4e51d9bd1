"""A Hyper-V host for tests: VMs with real VHDX disks, recovery checkpoints, reference points, RCT change
ranges, WMI jobs and scripted faults. See docs/hyperv.md, "The Hyper-V host model (tests)".

Everything lives under one folder, `root`:

* `root/host.json`: the state (host facts, VMs, snapshots, reference points, every guest write's range):
  `state.HostState`, rewritten after each change, read back by a new `HyperVHost(root)`.
* `root/drives/<letter>/...`: the files standing for the host's Windows paths (`windows_to_local`), so
  `C:\\Hyper-V\\Virtual Hard Disks\\web01.vhdx` is `root/drives/C/Hyper-V/Virtual Hard Disks/web01.vhdx`.
  A proxy's path mapping points `C:\\` at `root/drives/C`.

Disks are dynamic VHDX made by `qemu-img create -f vhdx`; guest writes into a base disk go through
vmrepl's VhdxWriter. A recovery checkpoint freezes each disk: a new differencing `<name>_<GUID>.avhdx`
(avhdx.py) whose parent locator names the frozen file (relative path, absolute Win32 path, parent_linkage =
the frozen file's DataWriteGuid) becomes the file the VM writes; the snapshot's disk path is the frozen
file. Removing or converting a snapshot merges the child of its frozen file into it, as Hyper-V does.

WMI methods (`create_snapshot`, `destroy_snapshot`, `convert_to_reference_point`, `destroy_reference_point`)
return a `MethodResult`: 0 with the out reference, or 4096 with a job that `poll_job` advances (the work is
done when the job reaches 7, so a failed or hung job changes nothing). `job_policy` chooses between them.
"""

from __future__ import annotations

import ntpath
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.support.hyperv import avhdx
from tests.support.hyperv import faults as f
from tests.support.hyperv.state import (
    REALIZED_SNAPSHOT,
    DiskState,
    HostState,
    NicState,
    ReferencePointState,
    SnapshotDiskState,
    SnapshotState,
    SwitchState,
    VmState,
    same_windows_path,
    windows_to_local,
)
from vmrepl.disk.vhdx import VhdxReader
from vmrepl.disk.vhdx_writer import VhdxWriter
from vmrepl.extent import Extent, MiB, merge
from vmrepl.providers.hyperv.models import CRASH_CONSISTENT, RCT_REFERENCE_POINT, RECOVERY_SNAPSHOT

JOB_STARTED = 4096
FAILED = 32768
INVALID_PARAMETER = 32773
FILE_NOT_FOUND = 32779
SYSTEM_IN_USE = 32774
INVALID_STATE = 32775
# Msvm_ComputerSystem.EnabledState by the cmdlet's VMState name (what VmState.state holds).
ENABLED_STATES = {"Running": 2, "Off": 3, "Stopping": 4, "Saved": 6, "Paused": 32768, "Starting": 10}
# Msvm_ConcreteJob.JobState
JOB_STARTING, JOB_RUNNING, JOB_COMPLETED, JOB_EXCEPTION = 3, 4, 7, 10
IN_PROGRESS = frozenset({2, 3, 4, 5, 6})

DEFAULT_DIR = "C:\\Hyper-V\\Virtual Hard Disks"


def rct_id(rct_guid: str, counter: int) -> str:
    """`rctX:<guid, ':' for '-'>:<8 hex counter>`, the shape of a real RCT id (fact sheet 1.5)."""
    return f"rctX:{rct_guid.replace('-', ':')}:{counter:08x}"


def parse_rct_id(value: str) -> tuple[str, int] | None:
    parts = value.split(":")
    if len(parts) != 7 or parts[0] != "rctX" or len(parts[6]) != 8:
        return None
    try:
        return str(uuid.UUID("-".join(parts[1:6]))), int(parts[6], 16)
    except ValueError:
        return None


@dataclass(frozen=True)
class JobPolicy:
    """How the WMI methods answer: `asynchronous` = 4096 and a job completing after `polls` polls (JobState
    3, then 4 until the last poll, then 7), else 0 with the out reference at once."""

    asynchronous: bool = True
    polls: int = 2


@dataclass(frozen=True)
class MethodResult:
    return_value: int
    job: str | None = None  # Msvm_ConcreteJob InstanceID when return_value is 4096
    out: str | None = None  # ResultingSnapshot / ResultingReferencePoint InstanceID when 0


@dataclass(frozen=True)
class JobView:
    state: int
    error_code: int = 0
    error_description: str = ""
    result: str | None = None  # the associated snapshot / reference point InstanceID once completed


@dataclass
class _Job:
    id: str
    method: str
    action: Any  # Callable[[], str | None]: the work, run when the job completes
    polls_left: int
    state: int = JOB_STARTING
    hang: bool = False
    until: float = 0.0  # wall-clock end of a SlowJob
    fail: f.JobFails | None = None
    result: str | None = None


@dataclass(frozen=True)
class DiskChangesResult:
    return_value: int
    processed: int = 0
    ranges: list[Extent] = field(default_factory=list)


class HyperVHost:
    """The model. Thread-safe: every public method holds one lock (the stand-in serves one thread a request)."""

    def __init__(
        self,
        root: Path,
        *,
        name: str = "HV01",
        os_build: int = 17763,
        ranges_per_call: int = 64,
        rct_granularity: int = 512,
        poll_interval: float = 0.01,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.root = root
        self.drives = root / "drives"
        self.drives.mkdir(parents=True, exist_ok=True)
        self._file = root / "host.json"
        self._lock = threading.RLock()
        self.lock = self._lock  # held by readers that must see one consistent state (handlers.py)
        if self._file.exists():
            self.state = HostState.model_validate_json(self._file.read_text(encoding="utf-8"))
        else:
            self.state = HostState(name=name, os_build=os_build)
            self._save()
        # GetVirtualDiskChanges's internal buffer: past this many ranges, ProcessedByteLength < ByteLength.
        self.ranges_per_call = ranges_per_call
        self.rct_granularity = rct_granularity  # changed ranges are rounded out to this
        self.poll_interval = poll_interval  # how long the scripts' job loop sleeps between polls
        # Time for jobs and the scripts' job loop (a fake clock in unit tests: no real waiting).
        self.monotonic, self.sleep = monotonic, sleep
        self.job_policy = JobPolicy()
        self._faults: list[list[Any]] = []  # [fault, remaining or None]
        self._jobs: dict[str, _Job] = {}
        self.calls: list[str] = []  # every WMI method called, in order
        # Cmdlet scripts write 5.1's "Preparing modules for first use." progress CLIXML on stderr (rc 0).
        self.progress_noise = True

    # ---- state ----------------------------------------------------------------------------------------

    def save(self) -> None:
        with self._lock:
            self._save()

    def invoke(self, method: str, action: Any) -> MethodResult:
        with self._lock:
            return self._invoke(method, action)

    def merge_file(self, child_local: Path, parent_local: Path, *, parent_is_base: bool) -> None:
        self._merge_file(child_local, parent_local, parent_is_base=parent_is_base)

    def _save(self) -> None:
        tmp = self._file.with_suffix(".tmp")
        tmp.write_text(self.state.model_dump_json(indent=1), encoding="utf-8")
        tmp.replace(self._file)

    def local(self, win_path: str) -> Path:
        """The local file standing for a Windows path on this host (state.windows_to_local)."""
        return windows_to_local(self.drives, win_path)

    def set_host(self, *, os_build: int | None = None, name: str | None = None) -> None:
        """Change host facts, e.g. os_build=9600 for a Windows Server 2012 R2 host (no RCT, refused)."""
        with self._lock:
            if os_build is not None:
                self.state.os_build = os_build
                if os_build < 14393:
                    self.state.supported_versions = ["5.0"]
            if name is not None:
                self.state.name = name
            self._save()

    def vm(self, vm: str) -> VmState:
        """A VM by id (any case) or name; KeyError if none or several match."""
        with self._lock:
            found = self.find_vms(vm)
            if len(found) != 1:
                raise KeyError(f"{len(found)} VMs match {vm!r}")
            return found[0]

    def find_vms(self, vm: str) -> list[VmState]:
        with self._lock:
            # Get-VM -Name matches names case-insensitively, as Windows does.
            return [v for v in self.state.vms if vm.casefold() in (v.id.casefold(), v.name.casefold())]

    def snapshot(self, snapshot_id: str) -> SnapshotState | None:
        with self._lock:
            return next((s for s in self.state.snapshots if s.id.casefold() == snapshot_id.casefold()), None)

    def reference_point(self, rp_id: str) -> ReferencePointState | None:
        with self._lock:
            return next((r for r in self.state.reference_points if r.id.casefold() == rp_id.casefold()), None)

    # ---- building VMs ---------------------------------------------------------------------------------

    def add_vm(
        self,
        name: str,
        *,
        disks: list[tuple[str, int]],
        controller: str = "SCSI",
        nics: list[NicState] | None = None,
        vm_id: str | None = None,
        **settings: Any,
    ) -> VmState:
        """A VM whose disks are new dynamic VHDX files (qemu-img) at the given Windows paths and sizes, on
        controller 0 at locations 0, 1, ... (IDE: controller 0 location 0/1, then controller 1)."""
        with self._lock:
            vid = (vm_id or str(uuid.uuid4())).upper()
            ctrl_guid = str(uuid.uuid4()).upper()
            states = []
            for i, (win_path, size) in enumerate(disks):
                number, location = (i // 2, i % 2) if controller == "IDE" else (0, i)
                where = f"{ctrl_guid}\\{number}\\{location}"
                states.append(
                    self._new_disk(f"Microsoft:{vid}\\{where}\\D", controller, (number, location), win_path, size)
                )
            default_nic = NicState(name="Network Adapter", switch="vSwitch", mac=_mac(vid))
            vm = VmState(id=vid, name=name, nics=[default_nic] if nics is None else nics, disks=states, **settings)
            self.state.vms.append(vm)
            self._save()
            return vm

    def _new_disk(
        self, instance_id: str, controller: str, slot: tuple[int, int], win_path: str, size: int
    ) -> DiskState:
        local = self.local(win_path)
        if local.exists():
            raise FileExistsError(f"{win_path} exists on the model host")
        local.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "vhdx", "-o", "subformat=dynamic", str(local), str(size)],
            check=True,
            capture_output=True,
        )
        with VhdxReader(local, follow_links=False) as r:
            block_size = r.geometry.block_size
        return DiskState(
            instance_id=instance_id,
            controller_type="IDE" if controller == "IDE" else "SCSI",
            controller_number=slot[0],
            controller_location=slot[1],
            chain=[win_path],
            size=size,
            block_size=block_size,
            rct_guid=str(uuid.uuid4()),
        )

    def disk(self, vm: str, disk: int | str) -> DiskState:
        """A VM's disk by index in enumeration order, instance id, or (any case) Windows path of its base."""
        v = self.vm(vm)
        if isinstance(disk, int):
            return v.disks[disk]
        for d in v.disks:
            if d.instance_id == disk or same_windows_path(d.chain[0], disk):
                return d
        raise KeyError(f"VM {v.name} has no disk {disk!r}")

    # ---- the guest ------------------------------------------------------------------------------------

    def write(self, vm: str, disk: int | str, offset: int, data: bytes) -> None:
        """The guest writes whole sectors: into the file the VM writes now, recorded for RCT."""
        with self._lock:
            if self.vm(vm).state != "Running":
                raise ValueError(f"VM {vm} is {self.vm(vm).state}: its guest writes nothing")
            d = self.disk(vm, disk)
            if offset % 512 or len(data) % 512 or not data or offset + len(data) > d.size:
                raise ValueError(f"a guest write is whole sectors inside the disk, not {len(data)} at {offset}")
            current = self.local(d.chain[-1])
            if len(d.chain) == 1:
                w = VhdxWriter(current)
                try:
                    w.write(data, offset)
                finally:
                    w.close()
            else:
                with avhdx.Avhdx(current) as a:
                    a.write(data, offset)
            d.seq += 1
            d.writes.append((d.seq, offset, len(data)))
            self._save()

    def read(self, vm: str, disk: int | str, offset: int = 0, length: int | None = None) -> bytes:
        """What the guest reads now (through the whole chain)."""
        with self._lock:
            d = self.disk(vm, disk)
            return self.read_file(d.chain[-1], offset, d.size - offset if length is None else length)

    def read_file(self, win_path: str, offset: int, length: int) -> bytes:
        """A disk file's logical view (a frozen checkpoint file too), read as vmrepl's reader reads it."""
        with VhdxReader(self.local(win_path), roots=[self.drives]) as r:
            buf = bytearray(length)
            r.read_into(memoryview(buf), offset)
            return bytes(buf)

    # ---- faults and jobs ------------------------------------------------------------------------------

    def add_fault(self, fault: f.Fault) -> None:
        with self._lock:
            self._faults.append([fault, fault.times])

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take_fault(self, method: str) -> f.Fault | None:
        for entry in self._faults:
            fault, left = entry
            if fault.method == method and (left is None or left > 0):
                if left is not None:
                    entry[1] = left - 1
                return fault  # type: ignore[no-any-return]
        return None

    def _invoke(self, method: str, action: Any) -> MethodResult:
        """Run a WMI method: a scripted fault, or the work now (0) or in a job (4096)."""
        self.calls.append(method)
        fault = self._take_fault(method)
        if isinstance(fault, f.ReturnCode):
            return MethodResult(fault.code)
        if fault is None and not self.job_policy.asynchronous:
            return MethodResult(0, out=action())
        job = _Job(
            id=f"Microsoft:{str(uuid.uuid4()).upper()}", method=method, action=action, polls_left=self.job_policy.polls
        )
        if isinstance(fault, f.JobFails):
            job.fail = fault
        elif isinstance(fault, f.JobHangs):
            job.hang = True
        elif isinstance(fault, f.SlowJob):
            job.until = self.monotonic() + fault.seconds
            job.polls_left = 1  # completes on the first poll after its time
        self._jobs[job.id] = job
        return MethodResult(JOB_STARTED, job=job.id)

    def settle_jobs(self) -> None:
        """A SlowJob past its time completes whether or not anyone polls it, as a host's jobs run on after
        the script that started them gave up (a checkpoint made after the client's timeout)."""
        with self._lock:
            for job in self._jobs.values():
                if job.until and job.state in IN_PROGRESS and self.monotonic() >= job.until:
                    self.poll_job(job.id)

    def poll_job(self, job_id: str) -> JobView:
        """Msvm_ConcreteJob as a new Get() shows it: advances the job by one poll."""
        with self._lock:
            job = self._jobs[job_id]
            if job.state in IN_PROGRESS and not job.hang and self.monotonic() >= job.until:
                job.polls_left -= 1
                if job.polls_left > 0:
                    job.state = JOB_RUNNING
                elif job.fail is not None:
                    job.state = JOB_EXCEPTION
                else:
                    job.result = job.action()
                    job.state = JOB_COMPLETED
            elif job.state == JOB_STARTING:
                job.state = JOB_RUNNING
            if job.fail is not None and job.state == JOB_EXCEPTION:
                return JobView(job.state, job.fail.error_code, job.fail.description)
            return JobView(job.state, result=job.result)

    # ---- WMI methods ----------------------------------------------------------------------------------

    def create_snapshot(self, vm_id: str, *, name: str, consistency_level: int = CRASH_CONSISTENT) -> MethodResult:
        """Msvm_VirtualSystemSnapshotService.CreateSnapshot with SnapshotType 32768 (recovery)."""
        with self._lock:
            vm = self.vm(vm_id)
            return self._invoke("CreateSnapshot", lambda: self._freeze(vm, name, RECOVERY_SNAPSHOT, consistency_level))

    def user_checkpoint(self, vm_id: str, name: str) -> SnapshotState:
        """A standard checkpoint a user made (Checkpoint-VM): the provider must report it and never touch it."""
        with self._lock:
            sid = self._freeze(self.vm(vm_id), name, REALIZED_SNAPSHOT, CRASH_CONSISTENT)
            snap = self.snapshot(sid)
            if snap is None:
                raise RuntimeError(f"the checkpoint {sid} just made is not in the state")
            return snap

    def _freeze(self, vm: VmState, name: str, kind: str, consistency_level: int) -> str:
        sid = str(uuid.uuid4()).upper()
        disks = []
        for d in vm.disks:
            frozen = d.chain[-1]
            folder, _, frozen_name = frozen.rpartition("\\")
            base_stem = d.chain[0].rpartition("\\")[2].rsplit(".", 1)[0]
            child = f"{folder}\\{base_stem}_{str(uuid.uuid4()).upper()}.avhdx"
            linkage = avhdx.data_write_guid(self.local(frozen))
            loc = avhdx.locator(parent_linkage=linkage, relative_path=f".\\{frozen_name}", absolute_win32_path=frozen)
            avhdx.create(self.local(child), size=d.size, block_size=d.block_size, parent=loc)
            d.chain.append(child)
            suffix = d.instance_id.split("\\", 1)[1]
            disks.append(
                SnapshotDiskState(
                    disk=d.instance_id,
                    instance_id=f"Microsoft:{sid}\\{suffix}",
                    path=frozen,
                    freeze_seq=d.seq,
                    rct_guid=d.rct_guid,
                )
            )
        created = datetime.now(UTC).isoformat()
        self.state.snapshots.append(
            SnapshotState(
                id=f"Microsoft:{sid}",
                vm_id=vm.id,
                name=name,
                type=kind,
                created=created,
                consistency_level=consistency_level,
                disks=disks,
            )
        )
        self._save()
        return f"Microsoft:{sid}"

    def destroy_snapshot(self, snapshot_id: str) -> MethodResult:
        """Msvm_VirtualSystemSnapshotService.DestroySnapshot: merges the snapshot's disks away."""
        with self._lock:
            if self.snapshot(snapshot_id) is None:
                return MethodResult(INVALID_PARAMETER)
            return self._invoke("DestroySnapshot", lambda: self._remove_snapshot(snapshot_id))

    def convert_to_reference_point(self, snapshot_id: str) -> MethodResult:
        """ConvertToReferencePoint: a reference point at the snapshot's freeze, then the snapshot merged away."""
        with self._lock:
            snap = self.snapshot(snapshot_id)
            if snap is None:
                return MethodResult(INVALID_PARAMETER)
            if snap.type != RECOVERY_SNAPSHOT:
                # Only recovery snapshots convert (fact sheet 1.4); the exact code a host returns is not
                # documented: 32775 "Invalid state for this operation" is the closest in the method's set.
                return MethodResult(f.INVALID_STATE)
            return self._invoke("ConvertToReferencePoint", lambda: self._convert(snapshot_id))

    def _convert(self, snapshot_id: str) -> str | None:
        snap = self.snapshot(snapshot_id)
        if snap is None:
            return None
        vm = self.vm(snap.vm_id)
        pairs = [(sd.disk, rct_id(sd.rct_guid, sd.freeze_seq)) for sd in snap.disks]
        # Deliberately not in the VM's disk order: pairing by position instead of VirtualDiskIdentifiers shows.
        pairs.reverse()
        rp = ReferencePointState(
            id=f"Microsoft:{str(uuid.uuid4()).upper()}",
            vm_id=vm.id,
            type=RCT_REFERENCE_POINT,
            consistency_level=snap.consistency_level,
            disk_ids=[d for d, _ in pairs],
            rct_ids=[r for _, r in pairs] if vm.rct_enabled else [],
        )
        self.state.reference_points.append(rp)
        self._remove_snapshot(snapshot_id)
        return rp.id

    def destroy_reference_point(self, rp_id: str) -> MethodResult:
        with self._lock:
            if self.reference_point(rp_id) is None:
                return MethodResult(INVALID_PARAMETER)
            return self._invoke("DestroyReferencePoint", lambda: self._drop_reference_point(rp_id))

    def _drop_reference_point(self, rp_id: str) -> None:
        self.state.reference_points = [r for r in self.state.reference_points if r.id.casefold() != rp_id.casefold()]
        self._save()

    def vanish_reference_point(self, rp_id: str) -> None:
        """The reference point is gone (someone else destroyed it, the host reset tracking): listing no longer
        shows it, and change tracking of its VM's disks starts over, so its RCT ids are unknown."""
        with self._lock:
            rp = self.reference_point(rp_id)
            if rp is None:
                raise KeyError(rp_id)
            self._drop_reference_point(rp_id)
            for d in self.vm(rp.vm_id).disks:
                d.rct_guid = str(uuid.uuid4())
            self._save()

    def set_guest_shutdown(self, vm: str, behaviour: str, polls: int = 2) -> None:
        """How the VM's guest answers InitiateShutdown: "clean" (off after `polls` power polls), "ignores" (runs
        on: the caller's wait ends), "none" (no shutdown integration service)."""
        with self._lock:
            v = self.vm(vm)
            v.guest_shutdown = behaviour  # type: ignore[assignment]  # validated by the state model
            v.shutdown_polls = polls
            self._save()

    def set_rct_enabled(self, vm: str, enabled: bool) -> None:
        """RCT off for a VM: reference points get no RCT ids and GetVirtualDiskChanges answers 32770."""
        with self._lock:
            self.vm(vm).rct_enabled = enabled
            self._save()

    # ---- merging --------------------------------------------------------------------------------------

    def _remove_snapshot(self, snapshot_id: str) -> None:
        snap = self.snapshot(snapshot_id)
        if snap is None:
            return
        vm = self.vm(snap.vm_id)
        for sd in snap.disks:
            d = next(x for x in vm.disks if x.instance_id == sd.disk)
            self._merge_child_into(d, sd.path)
        self.state.snapshots = [s for s in self.state.snapshots if s is not snap]
        self._save()

    def _merge_child_into(self, d: DiskState, frozen: str) -> None:
        """The file after `frozen` in the chain merges into it (byte for byte its view), is deleted, and every
        reference to it (the VM's current file, a later snapshot's path, its child's locator) moves to
        `frozen`."""
        i = next(k for k, p in enumerate(d.chain) if same_windows_path(p, frozen))
        parent_local, child = self.local(d.chain[i]), d.chain[i + 1]
        child_local = self.local(child)
        self._merge_file(child_local, parent_local, parent_is_base=i == 0)
        del d.chain[i + 1]
        if i + 1 < len(d.chain):
            name = frozen.rpartition("\\")[2]
            loc = avhdx.locator(
                parent_linkage=avhdx.data_write_guid(parent_local),
                relative_path=f".\\{name}",
                absolute_win32_path=frozen,
            )
            with avhdx.Avhdx(self.local(d.chain[i + 1])) as grandchild:
                grandchild.set_parent(loc)
        for s in self.state.snapshots:
            for sd in s.disks:
                if same_windows_path(sd.path, child):
                    sd.path = frozen
        child_local.unlink()

    def _merge_file(self, child_local: Path, parent_local: Path, *, parent_is_base: bool) -> None:
        """The sectors the differencing file holds written into its parent (the child is left in place)."""
        with avhdx.Avhdx(child_local) as c, VhdxReader(child_local, roots=[self.drives]) as r:
            present = c.present()
            writer: VhdxWriter | avhdx.Avhdx = VhdxWriter(parent_local) if parent_is_base else avhdx.Avhdx(parent_local)
            try:
                for e in present:
                    for at in range(e.offset, e.end, 4 * MiB):
                        buf = bytearray(min(4 * MiB, e.end - at))
                        r.read_into(memoryview(buf), at)
                        writer.write(bytes(buf), at)
                if isinstance(writer, avhdx.Avhdx) and present:
                    writer.new_data_write_guid()
            finally:
                writer.close()

    # ---- RCT ------------------------------------------------------------------------------------------

    def _frozen_disk(self, path: str) -> tuple[VmState, DiskState, SnapshotDiskState] | None:
        for s in self.state.snapshots:
            for sd in s.disks:
                if same_windows_path(sd.path, path):
                    vm = self.vm(s.vm_id)
                    return vm, next(d for d in vm.disks if d.instance_id == sd.disk), sd
        return None

    def get_virtual_disk_changes(self, path: str, limit_id: str, offset: int, length: int) -> DiskChangesResult:
        """Msvm_ImageManagementService.GetVirtualDiskChanges on a checkpoint's frozen file: the logical ranges
        the guest wrote after `limit_id` up to the freeze, merged, clipped to [offset, offset+length), at most
        `ranges_per_call` of them (then ProcessedByteLength stops at the last one returned, MS-RSVD 2.2.4.38)."""
        with self._lock:
            self.calls.append("GetVirtualDiskChanges")
            fault = self._take_fault("GetVirtualDiskChanges")
            if isinstance(fault, f.ReturnCode):
                return DiskChangesResult(fault.code)
            found = self._frozen_disk(path)
            if found is None:
                return DiskChangesResult(FILE_NOT_FOUND)
            vm, d, sd = found
            if not vm.rct_enabled:
                return DiskChangesResult(f.NOT_SUPPORTED)
            if offset < 0 or length <= 0 or offset + length > d.size:
                return DiskChangesResult(INVALID_PARAMETER)
            parsed = parse_rct_id(limit_id)
            # No capture of a host's answer to a stale or unknown LimitId exists (fact sheet 1.7, 9). 32768
            # "Failed" rather than 32779 "File not found": the file exists, it is the id that means nothing
            # to its change tracking; the provider falls back on any non-zero code either way.
            if parsed is None or parsed[0] != d.rct_guid or parsed[1] > sd.freeze_seq or sd.rct_guid != d.rct_guid:
                return DiskChangesResult(FAILED)
            if isinstance(fault, f.Stall):
                return DiskChangesResult(0, 0, [])
            return self._changes(d, parsed[1], sd.freeze_seq, offset, length)

    def _changes(self, d: DiskState, since: int, until: int, offset: int, length: int) -> DiskChangesResult:
        g = self.rct_granularity
        written = [
            Extent(off // g * g, min(d.size, -(-(off + n) // g) * g) - off // g * g)
            for seq, off, n in d.writes
            if since < seq <= until
        ]
        end = offset + length
        clipped = [
            Extent(max(e.offset, offset), min(e.end, end) - max(e.offset, offset))
            for e in merge(written)
            if e.end > offset and e.offset < end
        ]
        if len(clipped) > self.ranges_per_call:
            kept = clipped[: self.ranges_per_call]
            return DiskChangesResult(0, kept[-1].end - offset, kept)
        return DiskChangesResult(0, length, clipped)


def _mac(vm_id: str) -> str:
    return "00155D" + vm_id.replace("-", "")[:6].upper()


# ---- failover: VMs made from a configuration, switches, power, merges ---------------------------------------
# What register_vm, unregister_vm, change_vm_state, shutdown_vm, vm_power and merge_vm_disks do to the host. The
# cmdlet steps (New-VM, Set-VMMemory, Add-VMHardDiskDrive, ...) act at once; the WMI methods
# (CreateVirtualHardDisk, RequestStateChange, InitiateShutdown, DestroySystem, MergeVirtualHardDisk) go through
# `_invoke`, so they answer 0 or a job and take the scripted faults.


class CmdletError(Exception):
    """A cmdlet's terminating error (its text as Windows prints it)."""

    def __init__(self, cmdlet: str, message: str) -> None:
        super().__init__(message)
        self.cmdlet = cmdlet


def _switch(host: HyperVHost, name: str) -> SwitchState | None:
    return next((w for w in host.state.switches if w.name.casefold() == name.casefold()), None)


def new_vm(host: HyperVHost, *, name: str, folder: str, generation: int, memory: int, version: str) -> VmState:
    """New-VM -NoVHD: off, no disk, one unconnected adapter; `version` "" is the host's default (its newest)."""
    with host.lock:
        supported = host.state.supported_versions
        if version and version not in supported:
            raise CmdletError("New-VM", f"The virtual machine configuration version {version} is not supported.")
        vid = str(uuid.uuid4()).upper()
        vm = VmState(
            id=vid,
            name=name,
            state="Off",
            generation=generation,
            version=version or supported[-1],
            secure_boot=generation == 2,
            secure_boot_template="MicrosoftWindows" if generation == 2 else None,
            tpm=False if generation == 2 else None,
            processors=1,
            memory_startup=memory,
            nics=[NicState(name="Network Adapter", switch=None, mac="000000000000", dynamic_mac=True)],
            folder=f"{folder}\\{name}",
        )
        host.state.vms.append(vm)
        host.save()
        return vm


def add_switch(host: HyperVHost, name: str, kind: str = "Private") -> None:
    with host.lock:
        if _switch(host, name) is not None:
            raise CmdletError("New-VMSwitch", f"A switch named '{name}' already exists.")
        host.state.switches.append(SwitchState(name=name, type=kind))  # type: ignore[arg-type]
        host.save()


def remove_switch(host: HyperVHost, name: str) -> None:
    """Remove-VmreplPrivateSwitch: only a private switch of that name that no adapter uses."""
    with host.lock:
        w = _switch(host, name)
        used = any(n.switch and n.switch.casefold() == name.casefold() for v in host.state.vms for n in v.nics)
        if w is not None and w.type == "Private" and not used:
            host.state.switches.remove(w)
            host.save()


def add_nic(host: HyperVHost, vm: VmState, *, name: str, switch: str | None, mac: str | None, vlan: int | None) -> None:
    with host.lock:
        if switch is not None and _switch(host, switch) is None:
            raise CmdletError("Add-VMNetworkAdapter", f"Could not find Ethernet switch '{switch}'.")
        nic = NicState(name=name, switch=switch, mac=mac or "000000000000", dynamic_mac=mac is None, vlan_id=vlan)
        vm.nics.append(nic)
        host.save()


def create_differencing(host: HyperVHost, path: str, parent: str) -> MethodResult:
    """Msvm_ImageManagementService.CreateVirtualHardDisk (Type 4, Format 3): a differencing VHDX over `parent`."""
    with host.lock:
        parent_local = host.local(parent)
        if not parent_local.is_file():
            return MethodResult(FILE_NOT_FOUND)
        if host.local(path).exists():
            return MethodResult(INVALID_PARAMETER)

        def make() -> None:
            with VhdxReader(parent_local, follow_links=False) as r:
                size, block = r.size, r.geometry.block_size
            # The relative locator as Hyper-V writes it (`.\\name`, or `..\\m1\\name` for another folder).
            rel = ntpath.relpath(parent, path.rpartition("\\")[0])
            rel = rel if rel.startswith("..") else ".\\" + rel
            loc = avhdx.locator(
                parent_linkage=avhdx.data_write_guid(parent_local), relative_path=rel, absolute_win32_path=parent
            )
            host.local(path).parent.mkdir(parents=True, exist_ok=True)
            avhdx.create(host.local(path), size=size, block_size=block, parent=loc)

        return host.invoke("CreateVirtualHardDisk", make)


def attach_disk(host: HyperVHost, vm: VmState, slot: tuple[str, int, int], path: str, parent: str) -> None:
    """Add-VMHardDiskDrive at a slot (a generation 2 VM has no IDE; a slot holds one drive)."""
    kind, number, location = slot
    with host.lock:
        if kind == "IDE" and vm.generation == 2:
            raise CmdletError("Add-VMHardDiskDrive", "Generation 2 virtual machines do not support IDE controllers.")
        if any((d.controller_type, d.controller_number, d.controller_location) == slot for d in vm.disks):
            raise CmdletError("Add-VMHardDiskDrive", f"The {kind} slot {number}:{location} is in use.")
        with VhdxReader(host.local(path), roots=[host.drives]) as r:
            size, block = r.size, r.geometry.block_size
        where = f"{str(uuid.uuid4()).upper()}\\{number}\\{location}"
        vm.disks.append(
            DiskState(
                instance_id=f"Microsoft:{vm.id}\\{where}\\D",
                controller_type="IDE" if kind == "IDE" else "SCSI",
                controller_number=number,
                controller_location=location,
                chain=[parent, path],
                size=size,
                block_size=block,
                rct_guid=str(uuid.uuid4()),
            )
        )
        host.save()


def remove_vm(host: HyperVHost, vm_id: str) -> None:
    """Remove-VM (the script's undo): the VM's configuration gone, its files left."""
    with host.lock:
        host.state.vms = [v for v in host.state.vms if v.id.casefold() != vm_id.casefold()]
        host.save()


def request_state_change(host: HyperVHost, vm_id: str, wanted: int) -> MethodResult:
    """RequestStateChange: 2 starts (every disk file of the chain must exist), 3 turns off at once."""
    with host.lock:
        vm = host.vm(vm_id)
        missing = [p for d in vm.disks for p in d.chain if not host.local(p).is_file()]

        def change() -> None:
            vm.state = "Running" if wanted == 2 else "Off"
            vm.shutdown_left = None
            host.save()

        if wanted == 2 and missing:
            return MethodResult(FILE_NOT_FOUND)
        return host.invoke("RequestStateChange", change)


def initiate_shutdown(host: HyperVHost, vm_id: str) -> MethodResult:
    """InitiateShutdown: a clean guest is off after `shutdown_polls` power polls; one that ignores it runs on."""
    with host.lock:
        vm = host.vm(vm_id)
        if vm.state != "Running":
            return MethodResult(INVALID_STATE)

        def ask() -> None:
            if vm.guest_shutdown == "clean":
                vm.state, vm.shutdown_left = "Stopping", vm.shutdown_polls
                host.save()

        return host.invoke("InitiateShutdown", ask)


def power(host: HyperVHost, vm_id: str) -> int:
    """EnabledState as a new Get() shows it: a shutdown under way advances one step."""
    with host.lock:
        vm = host.vm(vm_id)
        if vm.state == "Stopping" and vm.shutdown_left is not None:
            vm.shutdown_left -= 1
            if vm.shutdown_left <= 0:
                vm.state, vm.shutdown_left = "Off", None
            host.save()
        return ENABLED_STATES.get(vm.state, 1)


def destroy_system(host: HyperVHost, vm_id: str) -> MethodResult:
    """DestroySystem: the VM must be off; its disk files are left."""
    with host.lock:
        vm = host.vm(vm_id)
        if vm.state != "Off":
            return MethodResult(INVALID_STATE)
        return host.invoke("DestroySystem", lambda: remove_vm(host, vm.id))


def merge_disk(host: HyperVHost, source: str, destination: str) -> MethodResult:
    """MergeVirtualHardDisk: the differencing file written into its parent, then deleted (as Merge-VHD does);
    refused (32774) while a VM that is not off uses it. The VM's drive still names the deleted file until
    Set-VMHardDiskDrive points it at the parent (`set_drive`)."""
    with host.lock:
        users = [v for v in host.state.vms for d in v.disks if any(same_windows_path(p, source) for p in d.chain)]
        if any(v.state != "Off" for v in users):
            return MethodResult(SYSTEM_IN_USE)
        if not host.local(source).is_file() or not host.local(destination).is_file():
            return MethodResult(FILE_NOT_FOUND)

        def merge() -> None:
            host.merge_file(host.local(source), host.local(destination), parent_is_base=True)
            host.local(source).unlink()

        return host.invoke("MergeVirtualHardDisk", merge)


def set_drive(host: HyperVHost, vm: VmState, slot: tuple[str, int, int], path: str) -> None:
    """Set-VMHardDiskDrive -Path: the drive now opens `path` (after a merge: the parent, alone)."""
    with host.lock:
        d = next(d for d in vm.disks if (d.controller_type, d.controller_number, d.controller_location) == slot)
        if not host.local(path).is_file():
            raise CmdletError("Set-VMHardDiskDrive", f"The system cannot find the file '{path}'.")
        i = next((k for k, p in enumerate(d.chain) if same_windows_path(p, path)), None)
        d.chain = d.chain[: i + 1] if i is not None else [path]
        host.save()
