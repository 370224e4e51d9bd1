"""Hyper-V failover calls over the real client: HyperVProvider -> vmrepl's WinRM client (unmodified pywinrm,
HTTPS with Basic and the lab CA, or HTTP with NTLM message encryption) -> the WS-Management stand-in -> the
Hyper-V host model (tests/support/hyperv), whose VMs have real VHDX disks and AVHDX differencing disks.

A VM is registered from the configuration `vm_configuration` captured of another stand-in VM, over disks
standing for a target's mount, and must come out with the same generation, firmware, processors, memory,
disk slots, and NICs on the mapped switches; then isolation, a guest that does not shut down in time, and an
unregister done twice."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import pytest
from pydantic import SecretStr

from controller import lab
from tests.support.hyperv.lab import HyperVLab, hyperv_lab
from tests.support.hyperv.state import NicState, SwitchState
from vmrepl.domain import DiskFormat, PowerState
from vmrepl.errors import DeadlineExceeded
from vmrepl.extent import MiB
from vmrepl.providers.base import NetworkMap, VmDiskSpec, VmSpec
from vmrepl.providers.hyperv.provider import HyperVProvider
from vmrepl.providers.hyperv.winrm import HostClient, WinRmSettings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SRC = "C:\\Hyper-V\\Virtual Hard Disks"
MOUNT = "D:\\vmrepl\\vms\\3f1c"
SIZES = (16 * MiB, 8 * MiB)


def provider_for(hv: HyperVLab) -> HyperVProvider:
    port = hv.port
    if hv.auth == "basic":
        settings = WinRmSettings(
            address="localhost",
            port=port,
            scheme="https",
            auth="basic",
            ca_bundle=str(hv.ca_bundle),
            username=hv.username,
            password=SecretStr(hv.password),
        )
    else:
        settings = WinRmSettings(
            address="localhost",
            port=port,
            scheme="http",
            auth="ntlm",
            username=hv.username,
            password=SecretStr(hv.password),
        )
    return HyperVProvider(runner=HostClient(settings), host="hv01", timeout_seconds=30, power_poll_seconds=0.05)


def seed(hv: HyperVLab) -> str:
    hv.host.state.switches.append(SwitchState(name="LAN-DR", type="External"))
    nics = [
        NicState(name="Front", switch="LAN", mac="00155D0A0B0C", vlan_id=12),
        NicState(name="Back", switch="DMZ", mac="00155D0A0B0D", dynamic_mac=True),
    ]
    vm = hv.host.add_vm(
        "web01",
        disks=[(f"{SRC}\\web01-{i}.vhdx", s) for i, s in enumerate(SIZES)],
        nics=nics,
        generation=2,
        processors=3,
        dynamic_memory=True,
        memory_startup=1024**3,
        memory_minimum=256 * MiB,
        memory_maximum=2 * 1024**3,
        secure_boot_template="MicrosoftUEFICertificateAuthority",
    )
    hv.host.write("web01", 0, 0, b"\x11" * 4096)
    hv.host.write("web01", 1, 5 * MiB, b"\x22" * 4096)
    return vm.id.lower()


def mount(hv: HyperVLab, folder: str = MOUNT) -> tuple[VmDiskSpec, ...]:
    """What the target's MountPoint leaves for a Hyper-V failover host: each point's disk as a VHDX file."""
    out = []
    for i, size in enumerate(SIZES):
        path = f"{folder}\\scsi0-{i}.vhdx"
        local = hv.host.local(path)
        local.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(hv.host.local(f"{SRC}\\web01-{i}.vhdx"), local)
        out.append(VmDiskSpec(disk_id=f"scsi0-{i}", path=path, format=DiskFormat.VHDX, size=size))
    return tuple(out)


@pytest.fixture(params=["basic", "ntlm"])
def hv(request: pytest.FixtureRequest, tmp_path: Path, lab_certs: lab.LabCerts) -> Iterator[HyperVLab]:
    auth: Literal["basic", "ntlm"] = request.param
    certs = lab_certs.directory if auth == "basic" else None
    with hyperv_lab(tmp_path / "host", certs=certs, auth=auth, stream_chunk=300, streams_per_receive=2) as lab_:
        yield lab_
    assert lab_.server.handler_errors == []


async def test_failover_vm_made_from_a_captured_configuration(hv: HyperVLab) -> None:
    source_id = seed(hv)
    p = provider_for(hv)
    config = await p.vm_configuration(source_id)
    disks = mount(hv)
    spec = VmSpec(
        name="web01-replica",
        folder=MOUNT,
        configuration=config,
        disks=disks,
        networks=(NetworkMap("LAN", "LAN-DR"),),
    )
    info = await p.register_vm(spec)
    assert info.power is PowerState.OFF
    assert dict(info.details)["disconnected_nics"].startswith("Back (switch 'DMZ'")
    made, src = hv.host.vm("web01-replica"), hv.host.vm("web01")
    same = ("generation", "version", "secure_boot", "secure_boot_template", "tpm", "processors", "dynamic_memory")
    assert {k: getattr(made, k) for k in same} == {k: getattr(src, k) for k in same}
    memory = ("memory_startup", "memory_minimum", "memory_maximum")
    assert {k: getattr(made, k) for k in memory} == {k: getattr(src, k) for k in memory}
    assert [(d.controller_type, d.controller_number, d.controller_location) for d in made.disks] == [
        (d.controller_type, d.controller_number, d.controller_location) for d in src.disks
    ]
    assert [d.chain[0] for d in made.disks] == [d.path for d in disks]
    assert {(n.name, n.switch, n.mac, n.vlan_id) for n in made.nics} == {
        ("Front", "LAN-DR", "00155D0A0B0C", 12),
        ("Back", None, "000000000000", None),
    }
    assert (await p.register_vm(spec)).vm_id == info.vm_id

    # Started, written, shut down cleanly: the point's files never change.
    point = [hashlib.sha256(hv.host.local(d.path).read_bytes()).digest() for d in disks]
    await p.start_vm(info.vm_id)
    assert (await p.get_vm(info.vm_id)).power is PowerState.RUNNING
    hv.host.write("web01-replica", 1, 1 * MiB, b"\x77" * 4096)
    assert hv.host.read("web01-replica", 1, 5 * MiB, 4096) == b"\x22" * 4096
    await p.shutdown_vm(info.vm_id, wait_seconds=30)
    assert (await p.get_vm(info.vm_id)).power is PowerState.OFF
    assert [hashlib.sha256(hv.host.local(d.path).read_bytes()).digest() for d in disks] == point

    await p.unregister_vm(info.vm_id)
    await p.unregister_vm(info.vm_id)
    assert hv.host.find_vms("web01-replica") == []
    assert not hv.host.local(f"{MOUNT}\\vmrepl-scsi0-1.vhdx").exists()
    assert all(hv.host.local(d.path).is_file() for d in disks)


async def test_isolated_test_failover_and_a_guest_that_does_not_shut_down(hv: HyperVLab) -> None:
    source_id = seed(hv)
    p = provider_for(hv)
    spec = VmSpec(
        name="web01-test-1",
        folder="D:\\vmrepl\\vms\\t1",
        configuration=await p.vm_configuration(source_id),
        disks=mount(hv, "D:\\vmrepl\\vms\\t1"),
        networks=(NetworkMap("LAN", "LAN-DR"),),
        isolated=True,
    )
    info = await p.register_vm(spec)
    switch = "vmrepl-isolated-web01-test-1"
    assert {n.switch for n in hv.host.vm("web01-test-1").nics} == {switch}
    assert any(w.name == switch and w.type == "Private" for w in hv.host.state.switches)
    await p.start_vm(info.vm_id)
    hv.host.set_guest_shutdown("web01-test-1", "ignores")
    with pytest.raises(DeadlineExceeded, match="did not shut down in time"):
        await p.shutdown_vm(info.vm_id, wait_seconds=0.5)
    assert (await p.get_vm(info.vm_id)).power is PowerState.RUNNING
    await p.unregister_vm(info.vm_id)
    assert switch not in {w.name for w in hv.host.state.switches}
    assert hv.host.find_vms("web01") and hv.host.vm("web01").state == "Running"
