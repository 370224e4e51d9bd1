"""The package's scripts answered by the Hyper-V host model, as Windows PowerShell 5.1 would print them.

`register(registry, host)` registers one handler per name in `vmrepl.providers.hyperv.scripts.SCRIPTS`,
keyed by `scripts.text(name)`: the stand-in recognises the exact text the package ships and never
interprets PowerShell. Each handler reads `VMREPL_PARAMS` (base64 of the params model's JSON) from the shell's
environment, validates it with the script's params model, does what the script does against the model
(including its WMI job loop: polling while JobState is 2..6 until `timeout_seconds`) and prints one compact
envelope line, UTF-8 with 5.1's escapes of `<>&'`, then CRLF: exit code 0 for `ok`, 1 for an error
envelope. Hyper-V cmdlet scripts also write 5.1's "Preparing modules for first use." progress record as CLIXML
on stderr with exit code 0, which a client must not take as a failure (`HyperVHost.progress_noise`).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from tests.support.hyperv import model as hv
from tests.support.hyperv.model import ENABLED_STATES, IN_PROGRESS, JOB_STARTED, HyperVHost, MethodResult
from tests.support.hyperv.state import SnapshotState, VmState
from tests.support.wsman import ScriptCall, ScriptRegistry, ScriptResult
from vmrepl.providers.hyperv import models as m
from vmrepl.providers.hyperv import scripts

PARAMS_VARIABLE = "VMREPL_PARAMS"
SNAPSHOT_SERVICE = "Msvm_VirtualSystemSnapshotService"
RP_SERVICE = "Msvm_VirtualSystemReferencePointService"
IMAGE_SERVICE = "Msvm_ImageManagementService"
WINDOWS_2016 = 14393

PROGRESS_CLIXML = (
    b"#< CLIXML\r\n"
    b'<Objs Version="1.1.0.1" xmlns="http://schemas.microsoft.com/powershell/2004/04">'
    b'<Obj S="progress" RefId="0"><TN RefId="0"><T>System.Management.Automation.PSCustomObject</T>'
    b'<T>System.Object</T></TN><MS><I64 N="SourceId">1</I64><PR N="Record"><AV>Preparing modules for first '
    b"use.</AV><AI>0</AI><Nil /><PI>-1</PI><PC>-1</PC><T>Completed</T><SR>-1</SR><SD> </SD></PR></MS></Obj></Objs>"
)

_CAPTIONS = {
    9600: "Microsoft Windows Server 2012 R2 Datacenter",
    14393: "Microsoft Windows Server 2016 Datacenter",
    17763: "Microsoft Windows Server 2019 Datacenter",
    20348: "Microsoft Windows Server 2022 Datacenter",
    26100: "Microsoft Windows Server 2025 Datacenter",
}


class ScriptError(Exception):
    """What the script turns into an error envelope."""

    def __init__(self, operation: str, message: str, code: int | None) -> None:
        super().__init__(message)
        self.operation, self.message, self.code = operation, message, code


def _ps_json(doc: dict[str, Any]) -> bytes:
    """`ConvertTo-Json -Compress` in 5.1: no spaces, non-ASCII as is, `<>&'` as \\u escapes (its
    JavaScriptSerializer does that), then Write-Output's CRLF."""
    text = json.dumps(doc, ensure_ascii=False, separators=(",", ":"))
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("'", "\\u0027")):
        text = text.replace(ch, esc)
    return text.encode("utf-8") + b"\r\n"


# ---- what the scripts print -------------------------------------------------------------------------


def enabled_state(state: str) -> int:
    """Msvm_ComputerSystem.EnabledState for the cmdlet's VMState name (1 Other for one the model lacks)."""
    return ENABLED_STATES.get(state, 1)


def vm_result(host: HyperVHost, vm: VmState) -> m.Vm:
    disks = [
        m.Disk(
            instance_id=d.instance_id,
            controller_type=d.controller_type,
            controller_number=d.controller_number,
            controller_location=d.controller_location,
            path=d.chain[-1],
            format="VHDX",
            type="Dynamic" if len(d.chain) == 1 else "Differencing",
            size=d.size,
            block_size=d.block_size,
            logical_sector_size=512,
            parent_chain=list(reversed(d.chain[:-1])),
        )
        for d in vm.disks
    ]
    nics = [
        m.Nic(name=n.name, switch=n.switch, mac=n.mac, dynamic_mac=n.dynamic_mac, vlan_id=n.vlan_id) for n in vm.nics
    ]
    gen2 = vm.generation == 2
    return m.Vm(
        id=vm.id.lower(),
        name=vm.name,
        state=vm.state,
        enabled_state=enabled_state(vm.state),
        generation=vm.generation,
        version=vm.version,
        secure_boot=vm.secure_boot if gen2 else None,
        secure_boot_template=vm.secure_boot_template if gen2 else None,
        tpm=vm.tpm if gen2 else None,
        processors=vm.processors,
        memory_startup=vm.memory_startup,
        dynamic_memory=vm.dynamic_memory,
        memory_minimum=vm.memory_minimum,
        memory_maximum=vm.memory_maximum,
        checkpoint_type=vm.checkpoint_type,
        notes=vm.notes,
        nics=nics,
        disks=disks,
        unsupported_disks=list(vm.unsupported_disks),
    )


def snapshot_result(host: HyperVHost, s: SnapshotState) -> m.Snapshot:
    disks = []
    for sd in s.disks:
        vm = host.vm(s.vm_id)
        size = next(d.size for d in vm.disks if d.instance_id == sd.disk)
        disks.append(m.SnapshotDisk(instance_id=sd.instance_id, path=sd.path, size=size))
    created = datetime.fromisoformat(s.created)
    return m.Snapshot(id=s.id, vm_id=s.vm_id.lower(), name=s.name, type=s.type, created=created, disks=disks)


def host_info(host: HyperVHost) -> m.HostInfo:
    build = host.state.os_build
    old = build < WINDOWS_2016
    return m.HostInfo(
        name=host.state.name,
        os_version=f"6.3.{build}.0" if old else f"10.0.{build}.0",
        os_build=build,
        os_caption=_CAPTIONS.get(build, f"Microsoft Windows Server (build {build})"),
        hyperv_version=f"6.3.{build}.16384" if old else f"10.0.{build}.1",
        supported_versions=list(host.state.supported_versions),
    )


# ---- the scripts ------------------------------------------------------------------------------------


def _one_vm(host: HyperVHost, vm_id: str) -> VmState:
    found = [v for v in host.find_vms(vm_id) if v.id.casefold() == vm_id.casefold()]
    if not found:
        raise ScriptError("Get-CimInstance", f"No virtual machine with the id '{vm_id}' exists on this host.", None)
    return found[0]


def _needs_2016(host: HyperVHost, what: str) -> None:
    if host.state.os_build < WINDOWS_2016:
        # On 2012 R2 the class or method does not exist: Invoke-CimMethod fails as a cmdlet (no WMI code).
        raise ScriptError(
            "Invoke-CimMethod", f"{what}: Method not found (Windows Server 2016 or later is required).", None
        )


def wait_job(host: HyperVHost, method: str, result: MethodResult, timeout: int) -> str | None:
    """The scripts' job loop: 0 uses the out reference; 4096 polls the job while JobState is 2..6."""
    if result.return_value == 0:
        return result.out
    if result.return_value != JOB_STARTED or result.job is None:
        raise ScriptError(method, f"{method} failed with return value {result.return_value}.", result.return_value)
    deadline = host.monotonic() + timeout
    while True:
        view = host.poll_job(result.job)
        if view.state in (7, 32768):
            return view.result
        if view.state not in IN_PROGRESS:
            text = view.error_description or f"The job of {method} ended in state {view.state}."
            raise ScriptError("Msvm_ConcreteJob", text, view.error_code)
        if host.monotonic() >= deadline:
            raise ScriptError("Msvm_ConcreteJob", f"The job of {method} did not finish within {timeout} seconds.", None)
        host.sleep(host.poll_interval)


P = TypeVar("P", bound=BaseModel)


def _p(params: BaseModel, kind: type[P]) -> P:
    if not isinstance(params, kind):
        raise TypeError(f"expected {kind.__name__}, got {type(params).__name__}")
    return params


def _list_vms(host: HyperVHost, _: BaseModel) -> Any:
    return [vm_result(host, v) for v in host.state.vms]


def _get_vm(host: HyperVHost, p: BaseModel) -> Any:
    p = _p(p, m.VmParams)
    return [vm_result(host, v) for v in host.find_vms(p.vm)]


def _create_checkpoint(host: HyperVHost, p: BaseModel) -> Any:
    p = _p(p, m.CreateCheckpointParams)
    vm = _one_vm(host, p.vm_id)
    method = f"{SNAPSHOT_SERVICE}.CreateSnapshot"
    if host.state.os_build < WINDOWS_2016:
        raise ScriptError(method, "Recovery checkpoints need Windows Server 2016 or later.", 1)
    sid = wait_job(
        host, method, host.create_snapshot(vm.id, name=p.name, consistency_level=p.consistency_level), p.timeout_seconds
    )
    with host.lock:
        snap = host.snapshot(sid or "")
        if snap is None:
            raise ScriptError("Get-CimAssociatedInstance", "The checkpoint job completed without a snapshot.", None)
        return snapshot_result(host, snap)


def _list_checkpoints(host: HyperVHost, p: BaseModel) -> Any:
    p = _p(p, m.VmParams)
    vm = _one_vm(host, p.vm)
    return [snapshot_result(host, s) for s in host.state.snapshots if s.vm_id == vm.id]


def _remove_checkpoint(host: HyperVHost, p: BaseModel) -> Any:
    p = _p(p, m.SnapshotParams)
    vm = _one_vm(host, p.vm_id)
    snap = host.snapshot(p.snapshot_id)
    if snap is None or snap.vm_id != vm.id:
        return m.Removed(removed=False)
    wait_job(host, f"{SNAPSHOT_SERVICE}.DestroySnapshot", host.destroy_snapshot(snap.id), p.timeout_seconds)
    return m.Removed(removed=True)


def _convert_checkpoint(host: HyperVHost, p: BaseModel) -> Any:
    p = _p(p, m.SnapshotParams)
    _needs_2016(host, f"{SNAPSHOT_SERVICE}.ConvertToReferencePoint")
    vm = _one_vm(host, p.vm_id)
    snap = host.snapshot(p.snapshot_id)
    if snap is None or snap.vm_id != vm.id:
        raise ScriptError("Get-CimInstance", f"No checkpoint '{p.snapshot_id}' of this virtual machine.", None)
    method = f"{SNAPSHOT_SERVICE}.ConvertToReferencePoint"
    rp = host.reference_point(wait_job(host, method, host.convert_to_reference_point(snap.id), p.timeout_seconds) or "")
    if rp is None:
        raise ScriptError("Get-CimAssociatedInstance", "The conversion completed without a reference point.", None)
    return _rp_result(rp)


def _rp_result(rp: Any) -> m.ReferencePoint:
    return m.ReferencePoint(
        id=rp.id,
        vm_id=rp.vm_id.lower(),
        type=rp.type,
        consistency_level=rp.consistency_level,
        disk_ids=list(rp.disk_ids),
        rct_ids=list(rp.rct_ids),
    )


def _list_reference_points(host: HyperVHost, p: BaseModel) -> Any:
    p = _p(p, m.VmParams)
    _needs_2016(host, "Msvm_VirtualSystemReferencePoint")
    vm = _one_vm(host, p.vm)
    return [_rp_result(r) for r in host.state.reference_points if r.vm_id == vm.id]


def _destroy_reference_point(host: HyperVHost, p: BaseModel) -> Any:
    p = _p(p, m.ReferencePointParams)
    _needs_2016(host, f"{RP_SERVICE}.DestroyReferencePoint")
    vm = _one_vm(host, p.vm_id)
    rp = host.reference_point(p.reference_point_id)
    if rp is None or rp.vm_id != vm.id:
        return m.Removed(removed=False)
    wait_job(host, f"{RP_SERVICE}.DestroyReferencePoint", host.destroy_reference_point(rp.id), p.timeout_seconds)
    return m.Removed(removed=True)


def _disk_changes(host: HyperVHost, p: BaseModel) -> Any:
    """The script's loop: `chunk`-sized calls advancing by ProcessedByteLength, early out past `max_ranges`,
    and stalled=true (never a spin) when ProcessedByteLength is 0."""
    p = _p(p, m.DiskChangesParams)
    _needs_2016(host, f"{IMAGE_SERVICE}.GetVirtualDiskChanges")
    pos, end = p.offset, p.offset + p.length
    ranges: list[m.ChangedRange] = []
    stalled = False
    while pos < end and len(ranges) < p.max_ranges:
        r = host.get_virtual_disk_changes(p.path, p.limit_id, pos, min(p.chunk, end - pos))
        if r.return_value != 0:
            method = f"{IMAGE_SERVICE}.GetVirtualDiskChanges"
            raise ScriptError(method, f"{method} failed with return value {r.return_value}.", r.return_value)
        ranges += [m.ChangedRange(offset=e.offset, length=e.length) for e in r.ranges]
        if r.processed == 0:
            stalled = True
            break
        pos += r.processed
    return m.DiskChanges(processed=pos - p.offset, ranges=ranges, stalled=stalled)


# ---- failover scripts -----------------------------------------------------------------------------------

COMPUTER_SYSTEM = "Msvm_ComputerSystem"


def _power(host: HyperVHost, vm: VmState) -> m.Power:
    return m.Power(vm_id=vm.id.lower(), enabled_state=hv.power(host, vm.id))


def _register_vm(host: HyperVHost, p: BaseModel) -> Any:
    """The script's steps, in its order; on any failure what it made is removed (Undo-VmreplRegister)."""
    p = _p(p, m.RegisterVmParams)
    made: dict[str, Any] = {"vm": None, "switch": None, "files": []}
    try:
        return _register_steps(host, p, made)
    except (ScriptError, hv.CmdletError) as e:
        _undo_register(host, made)
        if isinstance(e, hv.CmdletError):
            raise ScriptError(e.cmdlet, f"{e} (what the script had created was removed)", None) from e
        e.message += " (what the script had created was removed)"
        raise


def _register_steps(host: HyperVHost, p: m.RegisterVmParams, made: dict[str, Any]) -> m.Vm:
    if p.private_switch is not None:
        found = next((w for w in host.state.switches if w.name.casefold() == p.private_switch.casefold()), None)
        if found is None:
            hv.add_switch(host, p.private_switch, "Private")
            made["switch"] = p.private_switch
        elif found.type != "Private":
            raise ScriptError("New-VMSwitch", f"the switch {p.private_switch} exists and is not private", None)
    vm = hv.new_vm(
        host, name=p.name, folder=p.folder, generation=p.generation, memory=p.memory_startup, version=p.version
    )
    made["vm"] = vm.id
    with host.lock:
        vm.notes, vm.processors = p.creating, p.processors
        vm.dynamic_memory, vm.memory_minimum, vm.memory_maximum = p.dynamic_memory, p.memory_minimum, p.memory_maximum
        if p.generation == 2:
            vm.secure_boot = p.secure_boot
            vm.secure_boot_template = (p.secure_boot_template or "MicrosoftWindows") if p.secure_boot else None
            vm.tpm = vm.key_protector = p.tpm
        host.save()
    for d in p.disks:
        if host.local(d.path).exists():
            raise ScriptError(
                "Add-VmreplDisk", f"{d.path} exists already: vmrepl makes a VM's differencing disks itself", None
            )
        made["files"].append(d.path)
        method = f"{IMAGE_SERVICE}.CreateVirtualHardDisk"
        wait_job(host, method, hv.create_differencing(host, d.path, d.parent), p.timeout_seconds)
        hv.attach_disk(host, vm, (d.controller_type, d.controller_number, d.controller_location), d.path, d.parent)
    with host.lock:
        vm.nics = []
    for n in p.nics:
        hv.add_nic(host, vm, name=n.name, switch=n.switch, mac=n.mac, vlan=n.vlan_id)
    with host.lock:
        vm.notes = p.registered
        host.save()
        return vm_result(host, vm)


def _undo_register(host: HyperVHost, made: dict[str, Any]) -> None:
    if made["vm"] is not None:
        hv.remove_vm(host, made["vm"])
    for path in made["files"]:
        host.local(path).unlink(missing_ok=True)
    if made["switch"] is not None:
        hv.remove_switch(host, made["switch"])


def _unregister_vm(host: HyperVHost, p: BaseModel) -> Any:
    p = _p(p, m.UnregisterVmParams)
    found = [v for v in host.find_vms(p.vm_id) if v.id.casefold() == p.vm_id.casefold()]
    if found:
        vm = found[0]
        if hv.power(host, vm.id) != 3:
            wait_job(
                host,
                f"{COMPUTER_SYSTEM}.RequestStateChange",
                hv.request_state_change(host, vm.id, 3),
                p.timeout_seconds,
            )
        method = "Msvm_VirtualSystemManagementService.DestroySystem"
        wait_job(host, method, hv.destroy_system(host, vm.id), p.timeout_seconds)
    for path in p.delete_files:
        host.local(path).unlink(missing_ok=True)
    if p.private_switch is not None:
        hv.remove_switch(host, p.private_switch)
    return m.Removed(removed=bool(found))


def _change_vm_state(host: HyperVHost, p: BaseModel) -> Any:
    p = _p(p, m.VmStateParams)
    vm = _one_vm(host, p.vm_id)
    if hv.power(host, vm.id) != p.requested_state:
        method = f"{COMPUTER_SYSTEM}.RequestStateChange"
        wait_job(host, method, hv.request_state_change(host, vm.id, p.requested_state), p.timeout_seconds)
    return _power(host, vm)


def _shutdown_vm(host: HyperVHost, p: BaseModel) -> Any:
    p = _p(p, m.VmTimeoutParams)
    vm = _one_vm(host, p.vm_id)
    if hv.power(host, vm.id) != 3:
        if vm.guest_shutdown == "none":
            raise ScriptError(
                "Msvm_ShutdownComponent",
                f"the VM {vm.name} has no shutdown integration service: its guest cannot be shut down cleanly",
                None,
            )
        method = "Msvm_ShutdownComponent.InitiateShutdown"
        wait_job(host, method, hv.initiate_shutdown(host, vm.id), p.timeout_seconds)
    return _power(host, vm)


def _vm_power(host: HyperVHost, p: BaseModel) -> Any:
    p = _p(p, m.VmParams)
    return _power(host, _one_vm(host, p.vm))


def _merge_vm_disks(host: HyperVHost, p: BaseModel) -> Any:
    p = _p(p, m.MergeDisksParams)
    vm = _one_vm(host, p.vm_id)
    if hv.power(host, vm.id) != 3:
        raise ScriptError(
            COMPUTER_SYSTEM,
            f"the VM {vm.name} is not off: its differencing disks are merged only while it is off",
            32775,
        )
    merged = []
    for d in p.disks:
        if host.local(d.path).exists():
            method = f"{IMAGE_SERVICE}.MergeVirtualHardDisk"
            wait_job(host, method, hv.merge_disk(host, d.path, d.parent), p.timeout_seconds)
            host.local(d.path).unlink(missing_ok=True)
            merged.append(d.path)
        try:
            hv.set_drive(host, vm, (d.controller_type, d.controller_number, d.controller_location), d.parent)
        except hv.CmdletError as e:
            raise ScriptError(e.cmdlet, str(e), None) from e
    return m.Merged(merged=merged)


Runner = Callable[[HyperVHost, BaseModel], Any]
# name -> (the operation an ok envelope names, what runs, whether it loads the Hyper-V module)
_SCRIPTS: dict[str, tuple[str, Runner, bool]] = {
    "host_info": ("Get-VMHost", lambda h, _: host_info(h), True),
    "list_vms": ("Get-VM", _list_vms, True),
    "get_vm": ("Get-VM", _get_vm, True),
    "create_checkpoint": (f"{SNAPSHOT_SERVICE}.CreateSnapshot", _create_checkpoint, False),
    "list_checkpoints": ("Msvm_SnapshotOfVirtualSystem", _list_checkpoints, False),
    "remove_checkpoint": (f"{SNAPSHOT_SERVICE}.DestroySnapshot", _remove_checkpoint, False),
    "convert_checkpoint": (f"{SNAPSHOT_SERVICE}.ConvertToReferencePoint", _convert_checkpoint, False),
    "list_reference_points": ("Msvm_ReferencePointOfVirtualSystem", _list_reference_points, False),
    "destroy_reference_point": (f"{RP_SERVICE}.DestroyReferencePoint", _destroy_reference_point, False),
    "disk_changes": (f"{IMAGE_SERVICE}.GetVirtualDiskChanges", _disk_changes, False),
    "register_vm": ("New-VM", _register_vm, True),
    "unregister_vm": ("Msvm_VirtualSystemManagementService.DestroySystem", _unregister_vm, False),
    "change_vm_state": (f"{COMPUTER_SYSTEM}.RequestStateChange", _change_vm_state, False),
    "shutdown_vm": ("Msvm_ShutdownComponent.InitiateShutdown", _shutdown_vm, False),
    "vm_power": (COMPUTER_SYSTEM, _vm_power, False),
    "merge_vm_disks": (f"{IMAGE_SERVICE}.MergeVirtualHardDisk", _merge_vm_disks, False),
}


# The scripts that wait for a WMI job (never under the model's lock while they sleep).
_WAITING = frozenset(
    {
        "create_checkpoint",
        "remove_checkpoint",
        "convert_checkpoint",
        "destroy_reference_point",
        "register_vm",
        "unregister_vm",
        "change_vm_state",
        "shutdown_vm",
        "merge_vm_disks",
    }
)


def _params(name: str, env: dict[str, str]) -> BaseModel:
    raw = env.get(PARAMS_VARIABLE)
    if raw is None:
        raise ScriptError("ConvertFrom-Json", f"The environment variable {PARAMS_VARIABLE} is not set.", None)
    try:
        text = base64.b64decode(raw, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError) as e:
        raise ScriptError("ConvertFrom-Json", f"{PARAMS_VARIABLE} is not base64 of UTF-8 JSON: {e}", None) from e
    try:
        return scripts.SCRIPTS[name].params.model_validate_json(text)
    except ValidationError as e:
        raise ScriptError("ConvertFrom-Json", f"Invalid parameters: {e.errors(include_url=False)[:3]}", None) from e


def run(host: HyperVHost, name: str, env: dict[str, str]) -> ScriptResult:
    """What `powershell.exe` prints for the script `name` with this shell environment."""
    operation, runner, loads_module = _SCRIPTS[name]
    stderr = PROGRESS_CLIXML if loads_module and host.progress_noise else b""
    host.settle_jobs()
    try:
        params = _params(name, env)
        if name in _WAITING:
            result = runner(host, params)  # the job loop sleeps: the model locks each step itself
        else:
            with host.lock:  # a listing sees one consistent state
                result = runner(host, params)
    except ScriptError as e:
        doc = {"ok": False, "host": host.state.name, "operation": e.operation, "message": e.message, "code": e.code}
        return ScriptResult(stdout=_ps_json(doc), stderr=stderr, exit_code=1)
    if isinstance(result, list):
        payload: Any = [r.model_dump(mode="json") for r in result]
    else:
        payload = result.model_dump(mode="json")
    if name in {"create_checkpoint", "list_checkpoints"}:
        payload = _keep_dates(payload, result)
    doc = {"ok": True, "host": host.state.name, "operation": operation, "result": payload}
    return ScriptResult(stdout=_ps_json(doc), stderr=stderr, exit_code=0)


def _keep_dates(payload: Any, result: Any) -> Any:
    """`created` as the script prints it (.NET `ToString('o')`, 7 digits), not pydantic's re-serialisation."""
    items = result if isinstance(result, list) else [result]
    docs = payload if isinstance(payload, list) else [payload]
    for doc, snap in zip(docs, items, strict=True):
        doc["created"] = snap.created.strftime("%Y-%m-%dT%H:%M:%S.%f") + "0+00:00"
    return payload


def handler(host: HyperVHost, name: str) -> Callable[[ScriptCall], ScriptResult]:
    return lambda call: run(host, name, call.env)


def register(registry: ScriptRegistry, host: HyperVHost) -> None:
    """One handler per shipped script, keyed by its exact text (read from the package now)."""
    missing = set(scripts.SCRIPTS) ^ set(_SCRIPTS)
    if missing:
        raise RuntimeError(f"the host model and scripts.SCRIPTS disagree on: {sorted(missing)}")
    for name in scripts.SCRIPTS:
        registry.register(scripts.text(name), handler(host, name))
