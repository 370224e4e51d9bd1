"""Hyper-V failover calls (register_vm, unregister_vm, start/stop/shutdown, merge_vm_disks): the provider runs
the package's scripts in-process against the Hyper-V host model (tests/support/hyperv: each script's handler,
its envelope read back with `read_envelope`), so the VM a failover makes is a model VM with real VHDX parents
and AVHDX differencing disks. No sockets: the same over pywinrm is in tests/integration/test_hyperv_winrm.py.
The pure planning (failover.py) is tested at the end."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from tests.support.clock import Clock
from tests.support.hyperv import faults, handlers, serve
from tests.support.hyperv.model import HyperVHost, JobPolicy
from tests.support.hyperv.state import NicState, SwitchState
from vmrepl.domain import DiskFormat, PowerState
from vmrepl.errors import DeadlineExceeded, FailedPrecondition, HostError, HostOutputError, InvalidArgument
from vmrepl.extent import MiB
from vmrepl.providers.base import NetworkMap, VmDiskSpec, VmSpec
from vmrepl.providers.hyperv import failover as fo
from vmrepl.providers.hyperv import models as m
from vmrepl.providers.hyperv.envelope import read_envelope
from vmrepl.providers.hyperv.provider import HyperVProvider
from vmrepl.providers.hyperv.scripts import SCRIPTS

SRC = "C:\\Hyper-V\\Virtual Hard Disks"
MOUNT = "D:\\vmrepl\\vms\\m1"
SIZES = (16 * MiB, 8 * MiB)


class ModelRunner:
    """The ScriptRunner over the host model: parameters as the client sends them (base64 JSON in
    VMREPL_PARAMS), the handler's stdout read as the client reads it."""

    def __init__(self, host: HyperVHost) -> None:
        self.host = host
        self.calls: list[str] = []

    async def run(self, name: str, params: BaseModel) -> Any:
        self.calls.append(name)
        env = {"VMREPL_PARAMS": base64.b64encode(params.model_dump_json().encode()).decode()}
        out = handlers.run(self.host, name, env)
        return read_envelope(out.stdout, SCRIPTS[name].result)


class Lab:
    def __init__(self, tmp_path: Path) -> None:
        self.clock = Clock()
        self.host = HyperVHost(
            tmp_path / "host", poll_interval=0.1, monotonic=self.clock.seconds, sleep=self.clock.advance
        )
        self.host.job_policy = JobPolicy(asynchronous=True, polls=2)
        self.host.state.switches.append(SwitchState(name="LAN-DR", type="External"))
        nics = [
            NicState(name="Front", switch="LAN", mac="00155D0A0B0C", vlan_id=12),
            NicState(name="Back", switch="DMZ", mac="00155D0A0B0D", dynamic_mac=True),
        ]
        self.source = self.host.add_vm(
            "web01",
            disks=[(f"{SRC}\\web01-{i}.vhdx", s) for i, s in enumerate(SIZES)],
            nics=nics,
            processors=4,
            dynamic_memory=True,
            memory_startup=2 * 1024**3,
            memory_minimum=512 * MiB,
            memory_maximum=4 * 1024**3,
            tpm=True,
            secure_boot_template="MicrosoftUEFICertificateAuthority",
        )
        self.host.write("web01", 0, 0, b"\x11" * 4096)
        self.host.write("web01", 1, 3 * MiB, b"\x22" * 8192)
        self.runner = ModelRunner(self.host)

        async def sleep(seconds: float) -> None:
            self.clock.advance(seconds)

        self.provider = HyperVProvider(
            runner=self.runner, host="hv01", timeout_seconds=30, clock=self.clock.seconds, sleep=sleep
        )

    def mount(self, folder: str = MOUNT) -> tuple[VmDiskSpec, ...]:
        """The target's mount as the failover host sees it: a copy of each source disk (the point)."""
        out = []
        for i, size in enumerate(SIZES):
            path = f"{folder}\\scsi0-{i}.vhdx"
            local = self.host.local(path)
            local.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.host.local(f"{SRC}\\web01-{i}.vhdx"), local)
            out.append(VmDiskSpec(disk_id=f"scsi0-{i}", path=path, format=DiskFormat.VHDX, size=size))
        return tuple(out)

    async def spec(self, name: str = "web01-dr", **kw: Any) -> VmSpec:
        config = await self.provider.vm_configuration(self.source.id.lower())
        fields: dict[str, Any] = {
            "name": name,
            "folder": MOUNT,
            "configuration": config,
            "disks": self.mount(),
            "networks": (NetworkMap("LAN", "LAN-DR"),),
        }
        fields.update(kw)
        return VmSpec(**fields)

    def sha(self, win_path: str) -> str:
        return hashlib.sha256(self.host.local(win_path).read_bytes()).hexdigest()


@pytest.fixture
def lab(tmp_path: Path) -> Lab:
    return Lab(tmp_path)


async def test_a_vm_registered_from_a_captured_configuration_is_made_like_the_source(lab: Lab) -> None:
    spec = await lab.spec()
    info = await lab.provider.register_vm(spec)
    assert info.power is PowerState.OFF and info.name == "web01-dr"
    made = lab.host.vm("web01-dr")
    src = lab.source
    assert (made.generation, made.secure_boot, made.secure_boot_template) == (2, True, src.secure_boot_template)
    assert made.tpm is True and made.key_protector, "a vTPM with a new local key protector"
    assert (made.processors, made.dynamic_memory, made.memory_startup) == (4, True, src.memory_startup)
    assert (made.memory_minimum, made.memory_maximum) == (src.memory_minimum, src.memory_maximum)
    assert made.version == src.version and made.folder == f"{MOUNT}\\web01-dr"
    slots = {(d.controller_type, d.controller_number, d.controller_location): d.chain for d in made.disks}
    assert slots == {
        ("SCSI", 0, 0): [f"{MOUNT}\\scsi0-0.vhdx", f"{MOUNT}\\vmrepl-scsi0-0.vhdx"],
        ("SCSI", 0, 1): [f"{MOUNT}\\scsi0-1.vhdx", f"{MOUNT}\\vmrepl-scsi0-1.vhdx"],
    }
    nics = {n.name: (n.switch, n.mac, n.dynamic_mac, n.vlan_id) for n in made.nics}
    assert nics == {"Front": ("LAN-DR", "00155D0A0B0C", False, 12), "Back": (None, "000000000000", True, None)}
    details = dict(info.details)
    assert "Back" in details["disconnected_nics"] and "DMZ" in details["disconnected_nics"]
    assert details["failover_folder"] == MOUNT and "isolated_switch" not in details
    # The VM reads the point through its differencing disks.
    assert lab.host.read("web01-dr", 0, 0, 4096) == b"\x11" * 4096
    assert lab.host.read("web01-dr", 1, 3 * MiB, 8192) == b"\x22" * 8192
    # Idempotent by folder: the same VM, nothing made twice.
    again = await lab.provider.register_vm(spec)
    assert again.vm_id == info.vm_id and len(lab.host.find_vms("web01-dr")) == 1
    assert lab.runner.calls.count("register_vm") == 1


async def test_writes_after_failover_go_to_the_differencing_disks_then_merge_into_the_point(lab: Lab) -> None:
    info = await lab.provider.register_vm(await lab.spec())
    parents = [f"{MOUNT}\\scsi0-{i}.vhdx" for i in range(2)]
    before = [lab.sha(p) for p in parents]
    await lab.provider.start_vm(info.vm_id)
    await lab.provider.start_vm(info.vm_id)  # idempotent
    assert (await lab.provider.get_vm(info.vm_id)).power is PowerState.RUNNING
    lab.host.write("web01-dr", 0, 1 * MiB, b"\x99" * 4096)
    assert [lab.sha(p) for p in parents] == before, "the point is never written"
    with pytest.raises(FailedPrecondition, match=r"only\s+while its VM is off"):
        await lab.provider.merge_vm_disks(info.vm_id)
    await lab.provider.shutdown_vm(info.vm_id, wait_seconds=30)
    assert (await lab.provider.get_vm(info.vm_id)).power is PowerState.OFF
    await lab.provider.merge_vm_disks(info.vm_id)
    assert lab.sha(parents[0]) != before[0] and lab.sha(parents[1]) == before[1]
    assert not lab.host.local(f"{MOUNT}\\vmrepl-scsi0-0.vhdx").exists()
    assert [d.chain for d in lab.host.vm("web01-dr").disks] == [[p] for p in parents]
    await lab.provider.merge_vm_disks(info.vm_id)  # idempotent: nothing left to merge
    await lab.provider.start_vm(info.vm_id)
    assert lab.host.read("web01-dr", 0, 1 * MiB, 4096) == b"\x99" * 4096
    assert lab.host.read("web01-dr", 0, 0, 4096) == b"\x11" * 4096


async def test_unregister_removes_the_vm_and_its_differencing_disks_and_is_idempotent(lab: Lab) -> None:
    info = await lab.provider.register_vm(await lab.spec())
    await lab.provider.start_vm(info.vm_id)
    await lab.provider.unregister_vm(info.vm_id)  # running: turned off first
    assert lab.host.find_vms("web01-dr") == []
    assert not lab.host.local(f"{MOUNT}\\vmrepl-scsi0-0.vhdx").exists()
    assert lab.host.local(f"{MOUNT}\\scsi0-0.vhdx").is_file(), "the point's disks are the target's to remove"
    await lab.provider.unregister_vm(info.vm_id)
    assert "DestroySystem" in lab.host.calls


async def test_an_isolated_vm_gets_a_private_switch_of_its_own_removed_with_it(lab: Lab) -> None:
    info = await lab.provider.register_vm(await lab.spec(name="web01-test", isolated=True))
    switch = "vmrepl-isolated-web01-test"
    assert {(w.name, w.type) for w in lab.host.state.switches} >= {(switch, "Private")}
    assert {n.switch for n in lab.host.vm("web01-test").nics} == {switch}
    assert dict(info.details)["isolated_switch"] == switch and "disconnected_nics" not in dict(info.details)
    await lab.provider.unregister_vm(info.vm_id)
    assert switch not in {w.name for w in lab.host.state.switches}
    assert {"vSwitch", "LAN-DR"} <= {w.name for w in lab.host.state.switches}


async def test_a_guest_that_does_not_shut_down_in_time_is_a_deadline_left_running(lab: Lab) -> None:
    info = await lab.provider.register_vm(await lab.spec())
    await lab.provider.start_vm(info.vm_id)
    lab.host.set_guest_shutdown("web01-dr", "ignores")
    with pytest.raises(DeadlineExceeded, match="did not shut down in time"):
        await lab.provider.shutdown_vm(info.vm_id, wait_seconds=10)
    assert lab.clock.seconds() >= 10
    assert (await lab.provider.get_vm(info.vm_id)).power is PowerState.RUNNING
    lab.host.set_guest_shutdown("web01-dr", "none")
    with pytest.raises(HostError, match="no shutdown integration service"):
        await lab.provider.shutdown_vm(info.vm_id, wait_seconds=10)
    await lab.provider.stop_vm(info.vm_id)
    await lab.provider.stop_vm(info.vm_id)
    assert (await lab.provider.get_vm(info.vm_id)).power is PowerState.OFF
    await lab.provider.shutdown_vm(info.vm_id, wait_seconds=0)  # already off


async def test_a_failed_disk_creation_leaves_nothing_behind(lab: Lab) -> None:
    lab.host.add_fault(faults.JobFails("CreateVirtualHardDisk", description="The system cannot find the path."))
    spec = await lab.spec(name="web01-test", isolated=True)
    lab.host.add_fault(faults.ReturnCode("CreateVirtualHardDisk", faults.ACCESS_DENIED))
    with pytest.raises(HostError, match=r"cannot find the path.*removed"):
        await lab.provider.register_vm(spec)
    assert lab.host.find_vms("web01-test") == []
    assert not any(lab.host.local(f"{MOUNT}\\vmrepl-scsi0-{i}.vhdx").exists() for i in range(2))
    assert "vmrepl-isolated-web01-test" not in {w.name for w in lab.host.state.switches}
    with pytest.raises(HostError, match="32769"):
        await lab.provider.register_vm(spec)
    info = await lab.provider.register_vm(spec)
    assert info.power is PowerState.OFF


async def test_a_half_made_vm_is_removed_and_made_again(lab: Lab) -> None:
    spec = await lab.spec()
    first = await lab.provider.register_vm(spec)
    made = lab.host.vm("web01-dr")
    made.notes = fo.Note(MOUNT, "creating", (), None).text()
    lab.host.save()
    again = await lab.provider.register_vm(spec)
    assert again.vm_id != first.vm_id and len(lab.host.find_vms("web01-dr")) == 1
    assert fo.parse_note(lab.host.vm("web01-dr").notes) is not None


async def test_vms_vmrepl_did_not_make_are_left_alone(lab: Lab) -> None:
    with pytest.raises(FailedPrecondition, match="not registered by vmrepl"):
        await lab.provider.unregister_vm(lab.source.id)
    with pytest.raises(FailedPrecondition, match="not registered by vmrepl"):
        await lab.provider.merge_vm_disks(lab.source.id)
    assert lab.host.find_vms("web01")
    # A VM of the same name that is not vmrepl's does not make register_vm return it.
    info = await lab.provider.register_vm(await lab.spec(name="web01", folder="D:\\vmrepl\\vms\\m2"))
    assert info.vm_id != lab.source.id.lower() and len(lab.host.find_vms("web01")) == 2


async def test_power_follows_enabled_state_and_faults_are_host_errors(lab: Lab) -> None:
    info = await lab.provider.register_vm(await lab.spec())
    lab.host.add_fault(faults.vm_busy("RequestStateChange"))
    with pytest.raises(HostError, match="32775"):
        await lab.provider.start_vm(info.vm_id)
    lab.host.add_fault(faults.JobHangs("RequestStateChange"))
    with pytest.raises(HostError, match="did not finish"):
        await lab.provider.start_vm(info.vm_id)
    lab.host.vm("web01-dr").state = "Saved"
    assert (await lab.provider.get_vm(info.vm_id)).power is PowerState.OTHER
    assert {v.name: v.power for v in await lab.provider.list_vms()}["web01"] is PowerState.RUNNING
    lab.host.local(f"{MOUNT}\\scsi0-0.vhdx").unlink()  # the point's disk is gone: the VM cannot start
    lab.host.vm("web01-dr").state = "Off"
    with pytest.raises(HostError, match="32779"):
        await lab.provider.start_vm(info.vm_id)


# ---- planning, without a host ----------------------------------------------------------------------------------


def configuration(**vm: Any) -> bytes:
    doc: dict[str, Any] = {
        "schema": "vmrepl.hyperv.vm/1",
        "host": {"name": "hv01"},
        "vm": {
            "name": "web",
            "generation": 2,
            "version": "9.0",
            "firmware": {"secure_boot": True, "secure_boot_template": "MicrosoftWindows"},
            "tpm": False,
            "processors": 2,
            "memory": {"startup": 1024**3, "dynamic": False, "minimum": 0, "maximum": 0},
            "nics": [{"name": "n", "switch": "LAN", "mac": "00-15-5d-01-02-03", "dynamic_mac": False, "vlan_id": 0}],
            "disks": [{"disk_id": "scsi0-0"}, {"disk_id": "scsi0-1"}],
        },
    }
    doc["vm"].update(vm)
    return json.dumps(doc).encode()


INFO = m.HostInfo(
    name="hv02",
    os_version="10.0.20348.0",
    os_build=20348,
    os_caption="Microsoft Windows Server 2022 Datacenter",
    hyperv_version="10.0.20348.1",
    supported_versions=["8.0", "9.0", "10.0"],
)


def spec(config: bytes, **kw: Any) -> VmSpec:
    fields: dict[str, Any] = {
        "name": "web-dr",
        "folder": "D:\\vms\\web-dr\\",
        "configuration": config,
        "disks": (VmDiskSpec("scsi0-0", "D:\\vms\\web-dr\\base0.vhdx", DiskFormat.VHDX, MiB),),
    }
    fields.update(kw)
    return VmSpec(**fields)


def test_plan_keeps_static_macs_drops_bad_vlans_and_reports_what_it_leaves_out() -> None:
    p = fo.plan(spec(configuration()), INFO, timeout_seconds=60)
    assert p.params.folder == "D:\\vms\\web-dr"
    assert p.params.nics == [m.NewNic(name="n", switch=None, mac="00155D010203", vlan_id=None)]
    assert p.disconnected == ("n (switch 'LAN' is not in the network mapping)",)
    assert p.unattached == ("scsi0-1",)
    assert p.params.disks == [
        m.NewDisk(
            controller_type="SCSI",
            controller_number=0,
            controller_location=0,
            path="D:\\vms\\web-dr\\vmrepl-scsi0-0.vhdx",
            parent="D:\\vms\\web-dr\\base0.vhdx",
        )
    ]
    mapped = fo.plan(spec(configuration(), networks=(NetworkMap("lan", "LAN2"),)), INFO, timeout_seconds=60)
    assert mapped.params.nics[0].switch == "LAN2" and mapped.disconnected == ()


def test_plan_version_is_the_captured_one_or_the_hosts_default_never_older_host() -> None:
    assert fo.plan(spec(configuration()), INFO, timeout_seconds=1).params.version == "9.0"
    old = fo.plan(spec(configuration(version="7.1")), INFO, timeout_seconds=1)
    assert old.params.version == "" and "7.1" in old.version_note
    with pytest.raises(FailedPrecondition, match="newer than the failover host supports"):
        fo.plan(spec(configuration(version="12.0")), INFO, timeout_seconds=1)


@pytest.mark.parametrize(
    ("kw", "why"),
    [
        ({"configuration": b""}, "no Hyper-V VM configuration"),
        ({"configuration": b'{"schema":"vmrepl.file/1"}'}, "not a vmrepl.hyperv.vm/1"),
        ({"folder": "vms\\web"}, "absolute Windows folder"),
        ({"folder": "D:\\vms\\..\\x"}, "absolute Windows folder"),
        ({"folder": "D:\\"}, "absolute Windows folder"),
        ({"disks": (VmDiskSpec("sata0-0", "D:\\a.vhdx", DiskFormat.VHDX, 1),)}, "names no Hyper-V slot"),
        ({"disks": (VmDiskSpec("scsi4-0", "D:\\a.vhdx", DiskFormat.VHDX, 1),)}, "controllers 0-3"),
        ({"disks": (VmDiskSpec("ide0-0", "D:\\a.vhdx", DiskFormat.VHDX, 1),)}, "generation 2 VM has no IDE"),
        ({"disks": (VmDiskSpec("scsi0-0", "D:\\a.raw", DiskFormat.RAW, 1),)}, "need a VHDX parent"),
        ({"disks": (VmDiskSpec("scsi0-0", "a.vhdx", DiskFormat.VHDX, 1),)}, "not a host path"),
        (
            {"disks": (VmDiskSpec("scsi0-0", "D:\\vms\\web-dr\\vmrepl-scsi0-0.vhdx", DiskFormat.VHDX, 1),)},
            "not a host path",
        ),
        ({"name": ""}, "cannot name a Hyper-V VM"),
        ({"name": "..\\..\\Windows"}, "cannot name a Hyper-V VM"),
        ({"name": "web."}, "cannot name a Hyper-V VM"),
        ({"name": "a" * 101}, "cannot name a Hyper-V VM"),
        (
            {"configuration": configuration(memory={"startup": 4, "dynamic": True, "minimum": 8, "maximum": 16})},
            "minimum <= startup <= maximum",
        ),
    ],
)
def test_plan_refuses_what_cannot_be_made(kw: dict[str, Any], why: str) -> None:
    fields = {"config": configuration()} | kw
    if "configuration" in fields:
        fields["config"] = fields.pop("configuration")
    with pytest.raises((InvalidArgument, FailedPrecondition), match=why):
        fo.plan(spec(**fields), INFO, timeout_seconds=1)


def test_a_note_only_names_files_and_switches_vmrepl_makes() -> None:
    note = fo.Note("D:\\vms\\a", "registered", ("D:\\vms\\a\\vmrepl-scsi0-0.vhdx",), "vmrepl-isolated-a")
    assert fo.parse_note("notes of the admin\n" + note.text()) == note
    doc: dict[str, Any] = {"folder": "D:\\vms\\a", "state": "registered", "switch": "LAN"}
    doc["disks"] = ["D:\\vms\\a\\base.vhdx", "C:\\Windows\\vmrepl-x.vhdx", "D:\\vms\\a\\vmrepl-scsi0-1.vhdx"]
    planted = fo.parse_note(fo.NOTE_PREFIX + json.dumps(doc))
    assert planted == fo.Note("D:\\vms\\a", "registered", ("D:\\vms\\a\\vmrepl-scsi0-1.vhdx",), None)
    for bad in ("", "vmrepl-vm:{", "vmrepl-vm:[]", 'vmrepl-vm:{"folder":1,"state":"x","disks":[],"switch":null}'):
        assert fo.parse_note(bad) is None


def test_power_of_enabled_state() -> None:
    assert [fo.power_of(s) for s in (2, 3, 4, 6, 10, 32768)] == [PowerState.RUNNING, PowerState.OFF] + [
        PowerState.OTHER
    ] * 4


async def test_the_serve_control_endpoint_sets_guest_shutdown_and_switches(lab: Lab) -> None:
    serve.control(lab.host, {"op": "add_switch", "name": "DR-LAN"})
    assert SwitchState(name="DR-LAN", type="External") in lab.host.state.switches
    serve.control(lab.host, {"op": "guest_shutdown", "vm": "web01", "behaviour": "ignores"})
    assert lab.host.vm("web01").guest_shutdown == "ignores"
    with pytest.raises(ValueError):
        serve.control(lab.host, {"op": "guest_shutdown", "vm": "web01", "behaviour": "maybe"})
    with pytest.raises(DeadlineExceeded):
        await lab.provider.shutdown_vm(lab.source.id, wait_seconds=1)
    info = await lab.provider.register_vm(await lab.spec())
    fault = {"kind": "ReturnCode", "method": "MergeVirtualHardDisk", "code": 32774}
    assert serve.control(lab.host, {"op": "fault", "fault": fault}) == {}
    with pytest.raises(HostError, match="32774"):
        await lab.provider.merge_vm_disks(info.vm_id)
    await lab.provider.merge_vm_disks(info.vm_id)  # the next call finishes the work
    assert [len(d.chain) for d in lab.host.vm("web01-dr").disks] == [1, 1]


class TamperingRunner(ModelRunner):
    """The model's answers, one script's result replaced: host output the provider must not trust."""

    def __init__(self, host: HyperVHost, name: str, change: Any) -> None:
        super().__init__(host)
        self.name, self.change = name, change

    async def run(self, name: str, params: BaseModel) -> Any:
        result = await super().run(name, params)
        return self.change(result) if name == self.name else result


@pytest.mark.parametrize(
    ("script", "change", "why"),
    [
        ("register_vm", lambda vm: vm.model_copy(update={"notes": ""}), "not the one asked for"),
        ("register_vm", lambda vm: vm.model_copy(update={"name": "other"}), "not the one asked for"),
        ("change_vm_state", lambda p: p.model_copy(update={"enabled_state": 4}), "EnabledState 4 after starting"),
        ("register_vm", lambda vm: m.Removed(removed=True), "not Vm"),
    ],
)
async def test_host_output_that_does_not_match_the_call_is_refused(
    lab: Lab, script: str, change: Any, why: str
) -> None:
    spec = await lab.spec()
    p = HyperVProvider(runner=TamperingRunner(lab.host, script, change), host="hv01", timeout_seconds=30)
    with pytest.raises(HostOutputError, match=why):
        info = await p.register_vm(spec)
        await p.start_vm(info.vm_id)


async def test_shutdown_polls_power_until_off(lab: Lab) -> None:
    info = await lab.provider.register_vm(await lab.spec())
    await lab.provider.start_vm(info.vm_id)
    lab.host.set_guest_shutdown("web01-dr", "clean", polls=4)
    lab.runner.calls.clear()
    await lab.provider.shutdown_vm(info.vm_id, wait_seconds=60)
    assert lab.runner.calls[0] == "shutdown_vm" and set(lab.runner.calls[1:]) == {"vm_power"}
    assert 1 <= len(lab.runner.calls) - 1 <= 4 and lab.clock.seconds() <= 4 * 2.0


async def test_a_planted_differencing_file_is_refused_and_left_as_it_was(lab: Lab) -> None:
    spec = await lab.spec()
    planted = lab.host.local(f"{MOUNT}\\vmrepl-scsi0-1.vhdx")
    planted.write_bytes(b"not ours")
    with pytest.raises(HostError, match=r"exists already.*removed"):
        await lab.provider.register_vm(spec)
    assert planted.read_bytes() == b"not ours"
    assert lab.host.find_vms("web01-dr") == [] and not lab.host.local(f"{MOUNT}\\vmrepl-scsi0-0.vhdx").exists()
