"""Attacks on the Hyper-V failover calls: a VM note edited on the host, host output that names another VM,
slots spelled twice, names and folders Windows reads otherwise, a network mapping to a switch the host has
not. Each test failed before its fix; the host is the model of tests/support/hyperv (as test_hyperv_failover)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from controller.db.enums import SessionState
from controller.db.models import RestorePoint
from controller.engine.operations.plans import Operation
from tests.support.operations import make_ops_world
from tests.unit.test_hyperv_failover import INFO, Lab, TamperingRunner, configuration, spec
from tests.unit.test_operations import run
from vmrepl.domain import DiskFormat
from vmrepl.errors import FailedPrecondition, HostError, HostOutputError, InvalidArgument
from vmrepl.extent import MiB
from vmrepl.providers.base import NetworkMap, VmDiskSpec
from vmrepl.providers.hyperv import failover as fo
from vmrepl.providers.hyperv.provider import HyperVProvider

MOUNT = "D:\\vmrepl\\vms\\m1"


@pytest.fixture
def lab(tmp_path: Path) -> Lab:
    return Lab(tmp_path)


def _note(disks: list[str], folder: str = MOUNT) -> str:
    doc = {"folder": folder, "state": "registered", "disks": disks, "switch": None}
    return fo.NOTE_PREFIX + json.dumps(doc)


@pytest.mark.parametrize(
    "disk",
    [
        f"{MOUNT}\\vmrepl-x/../../../../C/Windows/win.ini",  # '/' is a separator on Windows too
        f"{MOUNT}\\vmrepl-scsi0-0.vhdx:stream",  # an alternate data stream
        f"{MOUNT}\\vmrepl-scsi0-0.vhdx.",  # Windows drops the dot: another file than it says
        f"{MOUNT}\\vmrepl-notes.txt",  # not a name vmrepl gives
    ],
)
def test_a_note_names_only_the_differencing_disks_vmrepl_names(disk: str) -> None:
    note = fo.parse_note(_note([disk, f"{MOUNT}\\vmrepl-scsi0-1.vhdx"]))
    assert note is not None and note.disks == (f"{MOUNT}\\vmrepl-scsi0-1.vhdx",)


@pytest.mark.parametrize("folder", ["D:\\vms\\a:b", "\\\\?\\D:\\vms\\a", "D:\\vms\\a/../../Windows", "D:\\vms\\a."])
def test_a_note_whose_folder_is_no_plain_folder_owns_no_disk(folder: str) -> None:
    note = fo.parse_note(_note([f"{folder}\\vmrepl-scsi0-0.vhdx"], folder=folder))
    assert note is not None and note.disks == ()


async def test_an_edited_note_does_not_make_unregister_delete_another_file(lab: Lab) -> None:
    info = await lab.provider.register_vm(await lab.spec())
    victim = lab.host.local("D:\\vmrepl\\vms\\keep.txt")
    victim.write_bytes(b"not vmrepl's")
    # Someone who may edit the VM's notes on the host (Hyper-V Administrators) plants a path.
    lab.host.vm("web01-dr").notes = _note([f"{MOUNT}\\vmrepl-a/../../keep.txt"])
    lab.host.save()
    await lab.provider.unregister_vm(info.vm_id)
    assert victim.read_bytes() == b"not vmrepl's"


@pytest.mark.parametrize("script", ["change_vm_state", "shutdown_vm"])
async def test_a_power_answer_about_another_vm_is_refused(lab: Lab, script: str) -> None:
    info = await lab.provider.register_vm(await lab.spec())
    other = lab.source.id.lower()
    runner = TamperingRunner(lab.host, script, lambda p: p.model_copy(update={"vm_id": other}))
    p = HyperVProvider(runner=runner, host="hv01", timeout_seconds=30)
    with pytest.raises(HostOutputError, match="another VM"):
        if script == "shutdown_vm":
            await p.shutdown_vm(info.vm_id, wait_seconds=1)
        else:
            await p.start_vm(info.vm_id)


async def test_a_power_poll_about_another_vm_is_refused(lab: Lab) -> None:
    info = await lab.provider.register_vm(await lab.spec())
    await lab.provider.start_vm(info.vm_id)
    lab.host.set_guest_shutdown("web01-dr", "clean", polls=3)
    other = lab.source.id.lower()
    runner = TamperingRunner(lab.host, "vm_power", lambda p: p.model_copy(update={"vm_id": other}))
    p = HyperVProvider(runner=runner, host="hv01", timeout_seconds=30)
    with pytest.raises(HostOutputError, match="another VM"):
        await p.shutdown_vm(info.vm_id, wait_seconds=30)


@pytest.mark.parametrize(
    ("first", "second"), [("scsi0-1", "scsi0-01"), ("scsi1-0", "scsi01-00"), ("ide0-1", "ide00-1")]
)
def test_one_slot_spelled_twice_is_refused(first: str, second: str) -> None:
    disks = (
        VmDiskSpec(first, "D:\\vms\\web-dr\\base0.vhdx", DiskFormat.VHDX, MiB),
        VmDiskSpec(second, "D:\\vms\\web-dr\\base1.vhdx", DiskFormat.VHDX, MiB),
    )
    with pytest.raises(InvalidArgument, match="slot"):
        fo.plan(spec(configuration(generation=1), disks=disks), INFO, timeout_seconds=1)


@pytest.mark.parametrize("name", ["CON", "nul", "COM1", "LPT9.web", "AUX .x", "CONIN$"])
def test_a_dos_device_name_cannot_name_a_vm(name: str) -> None:
    with pytest.raises(InvalidArgument, match="cannot name a Hyper-V VM"):
        fo.plan(spec(configuration(), name=name), INFO, timeout_seconds=1)


@pytest.mark.parametrize(
    "folder",
    [
        "\\\\?\\D:\\vms\\web-dr",  # a device-namespace path: not normalised by Windows
        "\\\\.\\D:\\vms\\web-dr",
        "D:\\vms\\web-dr:stream",
        "D:\\vms\\web-dr.",
        "D:\\vms \\web-dr",
        "D:\\vms\\web*",
        "D:\\vms\\CON\\web-dr",
    ],
)
def test_a_folder_windows_reads_otherwise_is_refused(folder: str) -> None:
    disks = (VmDiskSpec("scsi0-0", "D:\\base\\base0.vhdx", DiskFormat.VHDX, MiB),)
    with pytest.raises(InvalidArgument, match="absolute Windows folder"):
        fo.plan(spec(configuration(), folder=folder, disks=disks), INFO, timeout_seconds=1)


def test_plain_names_with_quotes_and_dollars_are_kept_as_data() -> None:
    name = "web `$(calc)' ${x}; x$()"
    p = fo.plan(spec(configuration(), name=name), INFO, timeout_seconds=1)
    assert p.params.name == name


async def test_a_mapping_to_a_switch_the_host_has_not_leaves_nothing_behind(lab: Lab) -> None:
    spec_ = await lab.spec(networks=(NetworkMap("LAN", "No-Such-Switch"),))
    with pytest.raises(HostError, match=r"No-Such-Switch.*removed"):
        await lab.provider.register_vm(spec_)
    assert lab.host.find_vms("web01-dr") == []
    assert not lab.host.local(f"{MOUNT}\\vmrepl-scsi0-0.vhdx").exists()


async def test_a_vm_of_the_same_name_with_another_folder_is_never_unregistered_for_it(lab: Lab) -> None:
    mine = await lab.provider.register_vm(await lab.spec())
    theirs = lab.host.add_vm("web01-dr", disks=[("E:\\other\\d.vhdx", MiB)])
    theirs.notes = "vmrepl-vm: looks like ours but is not JSON"
    lab.host.save()
    with pytest.raises(FailedPrecondition, match="not registered by vmrepl"):
        await lab.provider.merge_vm_disks(theirs.id)
    await lab.provider.unregister_vm(mine.vm_id)
    assert [v.id for v in lab.host.find_vms("web01-dr")] == [theirs.id]


@pytest.mark.parametrize(
    "vm",
    [
        {"processors": 0},
        {"processors": 10**6},
        {"memory": {"startup": 0, "dynamic": False, "minimum": 0, "maximum": 0}},
        {"memory": {"startup": 2**80, "dynamic": False, "minimum": 0, "maximum": 0}},
        {"nics": [{"name": "n" * 300, "switch": None, "mac": "", "dynamic_mac": True, "vlan_id": None}]},
        {"nics": [{"name": "n", "switch": None, "mac": "", "dynamic_mac": True, "vlan_id": None}] * 65},
        {"generation": 3},
    ],
)
def test_a_configuration_out_of_range_is_refused_before_the_host(vm: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument):
        fo.plan(spec(configuration(**vm)), INFO, timeout_seconds=1)


def test_one_switch_mapped_twice_without_case_is_refused_not_one_taken() -> None:
    nets = (NetworkMap("LAN", "LAN-A"), NetworkMap("lan", "LAN-B"))
    with pytest.raises(InvalidArgument, match="mapped to both"):
        fo.plan(spec(configuration(), networks=nets), INFO, timeout_seconds=1)
    same = (NetworkMap("LAN", "LAN-A"), NetworkMap("lan", "LAN-A"))
    assert fo.plan(spec(configuration(), networks=same), INFO, timeout_seconds=1).params.nics[0].switch == "LAN-A"


@pytest.mark.parametrize("op", [Operation.FAILOVER, Operation.TEST_FAILOVER])
async def test_a_long_or_windows_unsafe_source_name_still_names_a_failover_vm(tmp_path: Path, op: Operation) -> None:
    """The engine names the VM `<source name>_replica` or `<source name>_test_<id>`: a source VM named up to
    Hyper-V's 100 characters, or with characters New-VM cannot make a folder of, must still fail over."""
    ow = await make_ops_world(tmp_path)
    try:
        await ow.add_point()
        source = "SQL: prod/" + "x" * 90
        async with ow.w.journal.write() as db:
            await db.execute(update(RestorePoint).values(vm_name=source))
        session = await run(ow, op)
        assert session.state is SessionState.SUCCEEDED
        (vm_id,) = ow.failover.running()
        name = ow.failover.specs[vm_id].name
        assert fo.check_vm_name(name) == name and name.startswith("SQL_ prod_xxx")
        assert ("_replica" if op is Operation.FAILOVER else "_test_") in name[-14:], "the suffix is kept whole"
    finally:
        await ow.w.close()


@pytest.mark.parametrize(
    "change",
    [
        lambda vm: vm.model_copy(update={"disks": []}),
        lambda vm: vm.model_copy(update={"disks": vm.disks[:1]}),
        lambda vm: vm.model_copy(update={"id": "x" * 10_000}),
        lambda vm: vm.model_copy(update={"id": "web01"}),
    ],
)
async def test_a_registered_vm_said_to_lack_its_disks_or_id_is_refused(lab: Lab, change: Any) -> None:
    spec_ = await lab.spec()
    p = HyperVProvider(runner=TamperingRunner(lab.host, "register_vm", change), host="hv01", timeout_seconds=30)
    with pytest.raises(HostOutputError, match="not the one asked for"):
        await p.register_vm(spec_)


@pytest.mark.parametrize(
    "parent",
    [
        "D:\\vms\\web-dr\\..\\..\\Hyper-V\\other-vm.vhdx",
        "D:\\vms\\web-dr/../../Hyper-V/other-vm.vhdx",
        "D:\\vms\\web-dr\\base0.vhdx:stream",
        "D:\\vms\\web-dr\\base0.vhdx.",
        "\\\\?\\D:\\Hyper-V\\other-vm.vhdx",
    ],
)
def test_a_parent_that_is_not_plain_names_is_refused(parent: str) -> None:
    disks = (VmDiskSpec("scsi0-0", parent, DiskFormat.VHDX, MiB),)
    with pytest.raises(InvalidArgument, match="not a host path vmrepl can put a differencing disk over"):
        fo.plan(spec(configuration(), disks=disks), INFO, timeout_seconds=1)
