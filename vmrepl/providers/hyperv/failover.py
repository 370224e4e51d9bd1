"""What the Hyper-V provider decides when it registers a VM from a restore point (failover, test failover):
pure functions from a `VmSpec` and the configuration captured with the point (provider.py's
`vm_configuration`, schema `vmrepl.hyperv.vm/1`) to the `register_vm` script's parameters, and the note that
marks a VM as vmrepl's (docs/hyperv.md, "Failover on Hyper-V").

A VM vmrepl registers carries a note (Hyper-V's VM Notes): `creating` from the moment it exists, `registered`
once every disk and NIC is in place. The note names the folder it was made for, the differencing disks made
for it and the private switch made for it: `register_vm` is idempotent by folder, a VM half made by a call
cut short is found and removed, and `unregister_vm` removes only what vmrepl made (a VM without the note is
never touched).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vmrepl.domain import DiskFormat, PowerState
from vmrepl.errors import FailedPrecondition, InvalidArgument, PathError
from vmrepl.host_paths import check_name as check_path_name
from vmrepl.providers.base import VmSpec
from vmrepl.providers.hyperv import models as m

SCHEMA = "vmrepl.hyperv.vm/1"
NOTE_PREFIX = "vmrepl-vm:"
NOTE_TITLE = "Made by vmrepl (failover from a replica); vmrepl reads this note: do not edit it."
# The private switch of an isolated (test failover) VM is named after the VM.
ISOLATED_SWITCH_PREFIX = "vmrepl-isolated-"
DIFF_PREFIX = "vmrepl-"
_SLOT = re.compile(r"^(scsi|ide)(\d{1,2})-(\d{1,2})$")
_ABSOLUTE = re.compile(r"^(?:[A-Za-z]:\\|\\\\[^\\]+\\[^\\]+)")
_MAC = re.compile(r"^[0-9A-F]{12}$")
# The only file names `register_vm` gives the differencing disks it makes (`_disks`).
_DIFF = re.compile(r"vmrepl-(?:scsi|ide)\d{1,2}-\d{1,2}\.vhdx")
# New-VM -Path makes a folder named after the VM: a name must be a plain Windows file name.
_BAD_NAME = re.compile(r'[\\/:*?"<>|\x00-\x1f]')


def power_of(enabled_state: int) -> PowerState:
    """Msvm_ComputerSystem.EnabledState: 2 Enabled (running), 3 Disabled (off); anything else (starting,
    shutting down, saved, paused) is neither."""
    if enabled_state == m.ENABLED_STATE_RUNNING:
        return PowerState.RUNNING
    if enabled_state == m.ENABLED_STATE_OFF:
        return PowerState.OFF
    return PowerState.OTHER


# ---- the captured configuration --------------------------------------------------------------------


class _Cfg(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class _Memory(_Cfg):
    startup: int = Field(ge=1, le=m.MAX_VM_MEMORY)
    dynamic: bool
    minimum: int = Field(ge=0, le=m.MAX_VM_MEMORY)
    maximum: int = Field(ge=0, le=m.MAX_VM_MEMORY)


class _Firmware(_Cfg):
    secure_boot: bool | None
    secure_boot_template: str | None


class _Nic(_Cfg):
    name: str = Field(min_length=1, max_length=256)
    switch: str | None
    mac: str
    dynamic_mac: bool
    vlan_id: int | None


class _Disk(_Cfg):
    disk_id: str


class _Vm(_Cfg):
    name: str
    generation: Literal[1, 2]
    version: str
    firmware: _Firmware
    tpm: bool | None
    processors: int = Field(ge=1, le=2048)
    memory: _Memory
    nics: list[_Nic] = Field(max_length=64)
    disks: list[_Disk] = Field(max_length=256)


class _Host(_Cfg):
    name: str


class Configuration(_Cfg):
    schema_: Literal["vmrepl.hyperv.vm/1"] = Field(alias="schema")
    vm: _Vm
    host: _Host


def parse_configuration(raw: bytes) -> Configuration:
    if not raw:
        raise FailedPrecondition(
            "the restore point has no Hyper-V VM configuration: a Hyper-V VM cannot be made from it"
        )
    try:
        return Configuration.model_validate_json(raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise InvalidArgument("configuration", f"not a {SCHEMA} configuration ({where}: {err['msg']})") from None


# ---- the note ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Note:
    folder: str
    state: Literal["creating", "registered"]
    disks: tuple[str, ...]  # the differencing disks made for the VM (host paths)
    switch: str | None  # the private switch made for it

    def text(self) -> str:
        doc = {"folder": self.folder, "state": self.state, "disks": list(self.disks), "switch": self.switch}
        return f"{NOTE_TITLE}\n{NOTE_PREFIX}{json.dumps(doc, sort_keys=True, separators=(',', ':'))}"


def parse_note(notes: str) -> Note | None:
    """The note of a VM vmrepl made, or None (someone else's VM, or a note edited past reading)."""
    line = next((x for x in notes.splitlines() if x.startswith(NOTE_PREFIX)), None)
    if line is None:
        return None
    try:
        doc = json.loads(line[len(NOTE_PREFIX) :])
        folder, state, disks, switch = doc["folder"], doc["state"], doc["disks"], doc["switch"]
    except (ValueError, KeyError, TypeError):
        return None
    if (
        not isinstance(folder, str)
        or state not in ("creating", "registered")
        or not isinstance(disks, list)
        or not all(isinstance(d, str) for d in disks)
        or not (switch is None or isinstance(switch, str))
    ):
        return None
    # Only files vmrepl names itself, in the VM's folder, are ever deleted on the note's word: anyone who may
    # edit a VM's notes on the host could otherwise name any file (`vmrepl-x/../..`, `:stream`, a dot Windows drops).
    owned = tuple(
        d for d in disks if _plain_folder(folder) and same_path(parent_of(d), folder) and _DIFF.fullmatch(leaf(d))
    )
    if switch is not None and not switch.startswith(ISOLATED_SWITCH_PREFIX):
        switch = None
    return Note(folder=folder, state=state, disks=owned, switch=switch)


# ---- Windows paths ----------------------------------------------------------------------------------


def same_path(a: str, b: str) -> bool:
    """NTFS compares names without case; a trailing separator does not make another folder."""
    return a.rstrip("\\").casefold() == b.rstrip("\\").casefold()


def parent_of(path: str) -> str:
    return path.rpartition("\\")[0]


def leaf(path: str) -> str:
    return path.rpartition("\\")[2]


def _plain_folder(folder: str) -> bool:
    try:
        return check_folder(folder) == folder
    except InvalidArgument:
        return False


def check_folder(folder: str) -> str:
    """An absolute Windows folder (`D:\\vms\\web01` or `\\\\server\\share\\web01`), without its trailing separator,
    of plain names only (host_paths.check_name: no `\\\\?\\` or `\\\\.\\` form, stream, wildcard, DOS device, or
    name ending in a dot or space, which Windows would read as another folder)."""
    body = folder.rstrip("\\")
    if re.match(r"^[A-Za-z]:\\", folder):
        parts = body[3:].split("\\") if len(body) > 2 else []
    elif body.startswith("\\\\"):
        parts = body[2:].split("\\")
        parts = parts if len(parts) >= 3 else []
    else:
        parts = []
    try:
        for part in parts:
            check_path_name("spec.folder", part, folder)
    except PathError:
        parts = []
    if not parts or "/" in folder:
        raise InvalidArgument(
            "spec.folder", f"{folder!r} is not an absolute Windows folder (D:\\... or \\\\server\\share\\...)"
        )
    return body


# ---- the plan -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    params: m.RegisterVmParams
    note: Note
    # What the VM does not get from its configuration, said in VmInfo.details and the log.
    disconnected: tuple[str, ...]
    unattached: tuple[str, ...]
    version_note: str


def slot_of(disk_id: str) -> tuple[Literal["SCSI", "IDE"], int, int]:
    """`scsi0-1` -> SCSI controller 0, location 1 (the captured disk id names its slot)."""
    match = _SLOT.fullmatch(disk_id)
    if match is None:
        raise InvalidArgument("spec.disks", f"disk id {disk_id!r} names no Hyper-V slot (scsiN-L or ideN-L)")
    kind, number, location = match.group(1), int(match.group(2)), int(match.group(3))
    if kind == "ide":
        if number > 1 or location > 1:
            raise InvalidArgument("spec.disks", f"disk id {disk_id!r}: IDE has controllers 0-1, locations 0-1")
        return "IDE", number, location
    if number > 3 or location > 63:
        raise InvalidArgument("spec.disks", f"disk id {disk_id!r}: SCSI has controllers 0-3, locations 0-63")
    return "SCSI", number, location


def _disks(spec: VmSpec, folder: str, generation: int) -> list[m.NewDisk]:
    out: list[m.NewDisk] = []
    seen: dict[tuple[str, int, int], str] = {}
    for d in spec.disks:
        kind, number, location = slot = slot_of(d.disk_id)
        # By slot, not by id: `scsi0-1` and `scsi0-01` are one slot.
        if slot in seen:
            raise InvalidArgument(
                "spec.disks", f"disks {seen[slot]} and {d.disk_id} name one slot ({kind} {number}:{location})"
            )
        seen[slot] = d.disk_id
        if kind == "IDE" and generation == 2:
            raise InvalidArgument("spec.disks", f"disk {d.disk_id}: a generation 2 VM has no IDE controller")
        if d.format is not DiskFormat.VHDX:
            raise InvalidArgument(
                "spec.disks", f"disk {d.disk_id} is {d.format.value}: Hyper-V differencing disks need a VHDX parent"
            )
        path = f"{folder}\\{DIFF_PREFIX}{d.disk_id}.vhdx"
        # The parent (the target's mount, as the failover host names it) is plain names too: a `..`, `/` or a
        # stream would make the VM over another VHDX on the host.
        if same_path(path, d.path) or not _ABSOLUTE.match(d.path) or not _plain_folder(d.path):
            raise InvalidArgument(
                "spec.disks", f"disk {d.disk_id}: {d.path!r} is not a host path vmrepl can put a differencing disk over"
            )
        out.append(
            m.NewDisk(
                controller_type=kind, controller_number=number, controller_location=location, path=path, parent=d.path
            )
        )
    return out


def _mapping(spec: VmSpec) -> dict[str, str]:
    """Source switch (without case, as Hyper-V names switches) -> target switch; one source switch mapped to
    two targets (`LAN` and `lan`) is refused rather than one of them taken."""
    out: dict[str, str] = {}
    for n in spec.networks:
        key = n.source_switch.casefold()
        if out.get(key, n.target_switch) != n.target_switch:
            raise InvalidArgument(
                "spec.networks",
                f"switch {n.source_switch!r} is mapped to both {out[key]!r} and {n.target_switch!r}"
                " (Hyper-V switch names compare without case)",
            )
        out[key] = n.target_switch
    return out


def _nics(spec: VmSpec, vm: _Vm, switch: str | None) -> tuple[list[m.NewNic], list[str]]:
    mapping = _mapping(spec)
    nics: list[m.NewNic] = []
    disconnected: list[str] = []
    for nic in vm.nics:
        target = switch
        if switch is None and nic.switch is not None:
            target = mapping.get(nic.switch.casefold())
            if target is None:
                disconnected.append(f"{nic.name} (switch {nic.switch!r} is not in the network mapping)")
        mac = nic.mac.upper().replace("-", "").replace(":", "")
        vlan = nic.vlan_id if nic.vlan_id is not None and 1 <= nic.vlan_id <= 4094 else None
        static = None if nic.dynamic_mac or not _MAC.fullmatch(mac) else mac
        nics.append(m.NewNic(name=nic.name, switch=target, mac=static, vlan_id=vlan))
    return nics, disconnected


def _version(vm: _Vm, supported: list[str]) -> tuple[str, str]:
    """The configuration version to create: the captured one when the host supports it, else the host's
    default when that is newer (noted); a version newer than the host supports is refused."""
    if vm.version in supported:
        return vm.version, ""
    numbers = [v for v in (_numbers(s) for s in supported) if v is not None]
    captured = _numbers(vm.version)
    if captured is not None and numbers and captured > max(numbers):
        raise FailedPrecondition(
            f"the VM's configuration version {vm.version} is newer than the failover host supports"
            f" ({', '.join(supported)}): fail over to a host as new as the source"
        )
    return "", f"configuration version {vm.version} is not supported by the host: made at the host's default"


def _numbers(text: str) -> tuple[int, ...] | None:
    try:
        return tuple(int(p) for p in text.split("."))
    except ValueError:
        return None


def _device_free(name: str) -> bool:
    """Not a DOS device name (`CON`, `nul.x`, `COM1`): a VM folder of that name would open the device."""
    try:
        check_path_name("spec.name", name, name)
    except PathError:
        return False
    return True


def check_vm_name(name: str) -> str:
    bad = not name or _BAD_NAME.search(name) or name.strip(" .") != name or len(name) > 100
    if bad or not _device_free(name):
        raise InvalidArgument(
            "spec.name",
            f"{name!r} cannot name a Hyper-V VM's folder (no \\ / : * ? \" < > |, no leading or trailing dot or space,"
            " no DOS device name such as CON or COM1)",
        )
    return name


def _check_memory(mem: _Memory) -> None:
    if mem.dynamic and not (mem.minimum <= mem.startup <= mem.maximum):
        raise InvalidArgument(
            "configuration.vm.memory",
            f"dynamic memory needs minimum <= startup <= maximum ({mem.minimum}, {mem.startup}, {mem.maximum})",
        )


def plan(spec: VmSpec, info: m.HostInfo, *, timeout_seconds: int) -> Plan:
    cfg = parse_configuration(spec.configuration)
    vm = cfg.vm
    check_vm_name(spec.name)
    _check_memory(vm.memory)
    folder = check_folder(spec.folder)
    switch = f"{ISOLATED_SWITCH_PREFIX}{spec.name}" if spec.isolated else None
    disks = _disks(spec, folder, vm.generation)
    nics, disconnected = _nics(spec, vm, switch)
    version, version_note = _version(vm, list(info.supported_versions))
    note = Note(folder=folder, state="registered", disks=tuple(d.path for d in disks), switch=switch)
    creating = Note(folder=folder, state="creating", disks=note.disks, switch=switch)
    gen2 = vm.generation == 2
    try:
        params = m.RegisterVmParams(
            name=spec.name,
            folder=folder,
            creating=creating.text(),
            registered=note.text(),
            generation=vm.generation,
            version=version,
            secure_boot=bool(gen2 and vm.firmware.secure_boot),
            secure_boot_template=(vm.firmware.secure_boot_template or "") if gen2 else "",
            tpm=bool(gen2 and vm.tpm),
            processors=vm.processors,
            memory_startup=vm.memory.startup,
            dynamic_memory=vm.memory.dynamic,
            memory_minimum=vm.memory.minimum,
            memory_maximum=vm.memory.maximum,
            private_switch=switch,
            nics=nics,
            disks=disks,
            timeout_seconds=timeout_seconds,
        )
    except ValidationError as e:
        err = e.errors()[0]
        raise InvalidArgument(".".join(str(p) for p in err["loc"]) or "spec", err["msg"]) from None
    given = {d.disk_id for d in spec.disks}
    unattached = tuple(sorted({d.disk_id for d in vm.disks} - given))
    return Plan(params, note, tuple(disconnected), unattached, version_note)


def details(p: Plan) -> tuple[tuple[str, str], ...]:
    out = [("failover_folder", p.params.folder)]
    if p.params.private_switch:
        out.append(("isolated_switch", p.params.private_switch))
    if p.disconnected:
        out.append(("disconnected_nics", "; ".join(p.disconnected)))
    if p.unattached:
        out.append(("disks_not_attached", ", ".join(p.unattached)))
    if p.version_note:
        out.append(("version", p.version_note))
    return tuple(out)
