"""HyperVProvider against a fake ScriptRunner: a typed in-process host that answers each shipped script with
its result model, records every call, and can be scripted to fail. No sockets, no PowerShell."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import BaseModel
from structlog.testing import capture_logs

from vmrepl.domain import Consistency, DiskFormat
from vmrepl.errors import FailedPrecondition, HostError, HostOutputError, InvalidArgument, NotFound
from vmrepl.extent import Extent
from vmrepl.names import check_name
from vmrepl.providers.base import Checkpoint, CheckpointRequest, DiskInCheckpoint, Untracked
from vmrepl.providers.hyperv import models as m
from vmrepl.providers.hyperv import reference as rf
from vmrepl.providers.hyperv.changes import ChangeLimits
from vmrepl.providers.hyperv.provider import HyperVProvider, checkpoint_name, snapshot_instance
from vmrepl.providers.hyperv.scripts import SCRIPTS

MiB = 1024**2
GiB = 1024**3
HOST = "hv01"
VM_ID = "6E0E9F28-3A5B-4C2D-9E1F-0123456789AB"
OTHER_ID = "11111111-2222-3333-4444-555555555555"
SNAP_GUID = "AAAAAAAA-BBBB-CCCC-DDDD-EEEEEEEEEEEE"
IDE = "83F8638B-8DCA-4152-9EDA-2CA8B33039B4"
SCSI = "D422512D-2BF2-4752-809D-7B82B5FCB1B4"


def tail(ctype: str, number: int, location: int) -> str:
    return f"{IDE if ctype == 'IDE' else SCSI}\\{number}\\{location}\\L"


def disk(ctype: str, number: int, location: int, *, fmt: str = "VHDX", size: int = 10 * MiB) -> m.Disk:
    return m.Disk(
        instance_id=f"Microsoft:{VM_ID}\\{tail(ctype, number, location)}",
        controller_type="SCSI" if ctype == "SCSI" else "IDE",
        controller_number=number,
        controller_location=location,
        path=f"D:\\VMs\\web\\{ctype.lower()}{number}{location}_5F4C.avhdx",
        format=fmt,  # type: ignore[arg-type]
        type="Differencing",
        size=size,
        block_size=32 * MiB,
        logical_sector_size=512,
        parent_chain=[f"D:\\VMs\\web\\{ctype.lower()}{number}{location}.{fmt.lower()}"],
    )


def vm(vm_id: str = VM_ID, name: str = "web", disks: list[m.Disk] | None = None, **kw: Any) -> m.Vm:
    fields: dict[str, Any] = {
        "id": vm_id,
        "name": name,
        "state": "Running",
        "enabled_state": 2,
        "generation": 2,
        "version": "9.0",
        "secure_boot": True,
        "secure_boot_template": "MicrosoftWindows",
        "tpm": False,
        "processors": 4,
        "memory_startup": 4 * GiB,
        "dynamic_memory": True,
        "memory_minimum": 512 * MiB,
        "memory_maximum": 8 * GiB,
        "checkpoint_type": "Production",
        "notes": "",
        "nics": [m.Nic(name="Network Adapter", switch="LAN", mac="00155D010203", dynamic_mac=False, vlan_id=None)],
        "disks": [disk("SCSI", 0, 0), disk("SCSI", 0, 1)] if disks is None else disks,
        "unsupported_disks": [],
    }
    fields.update(kw)
    return m.Vm(**fields)


def host_info(build: int = 17763) -> m.HostInfo:
    return m.HostInfo(
        name=HOST,
        os_version=f"10.0.{build}.0",
        os_build=build,
        os_caption="Microsoft Windows Server 2019 Datacenter",
        hyperv_version="10.0.17763.1",
        supported_versions=["9.0", "8.0"],
    )


@dataclass
class FakeHost:
    """The ScriptRunner: one handler per script, a queue of scripted failures per script, every call kept."""

    vms: list[m.Vm] = field(default_factory=lambda: [vm()])
    info: m.HostInfo = field(default_factory=host_info)
    snapshots: list[m.Snapshot] = field(default_factory=list)
    points: list[m.ReferencePoint] = field(default_factory=list)
    calls: list[tuple[str, BaseModel]] = field(default_factory=list)
    fail: dict[str, list[Exception]] = field(default_factory=dict)
    reverse_snapshot_disks: bool = True
    changes: Callable[[m.DiskChangesParams], m.DiskChanges] | None = None

    async def run(self, name: str, params: BaseModel) -> Any:
        assert isinstance(params, SCRIPTS[name].params), (name, params)
        self.calls.append((name, params))
        if self.fail.get(name):
            raise self.fail[name].pop(0)
        handler: Callable[[Any], Any] = getattr(self, f"_{name}")
        return handler(params)

    def called(self, name: str) -> list[Any]:
        return [p for n, p in self.calls if n == name]

    def _host_info(self, p: m.NoParams) -> m.HostInfo:
        return self.info

    def _list_vms(self, p: m.NoParams) -> list[m.Vm]:
        return list(self.vms)

    def _get_vm(self, p: m.VmParams) -> list[m.Vm]:
        return [v for v in self.vms if v.id.lower() == p.vm.lower() or v.name.casefold() == p.vm.casefold()]

    def _create_checkpoint(self, p: m.CreateCheckpointParams) -> m.Snapshot:
        (the_vm,) = [v for v in self.vms if v.id == p.vm_id]
        frozen = [
            m.SnapshotDisk(
                instance_id=f"Microsoft:{SNAP_GUID}\\{d.instance_id.split(chr(92), 1)[1]}",
                path=d.path.replace(".avhdx", "_frozen.vhdx"),
                size=d.size,
            )
            for d in the_vm.disks
        ]
        if self.reverse_snapshot_disks:
            frozen.reverse()
        snap = m.Snapshot(
            id=f"Microsoft:{SNAP_GUID}",
            vm_id=p.vm_id,
            name=p.name,
            type=m.RECOVERY_SNAPSHOT,
            created=datetime(2026, 12, 1, 1, 0, tzinfo=UTC),
            disks=frozen,
        )
        self.snapshots.append(snap)
        return snap

    def _list_checkpoints(self, p: m.VmParams) -> list[m.Snapshot]:
        return [s for s in self.snapshots if s.vm_id == p.vm]

    def _remove_checkpoint(self, p: m.SnapshotParams) -> m.Removed:
        before = len(self.snapshots)
        self.snapshots = [s for s in self.snapshots if s.id != p.snapshot_id]
        return m.Removed(removed=len(self.snapshots) < before)

    def _convert_checkpoint(self, p: m.SnapshotParams) -> m.ReferencePoint:
        (snap,) = [s for s in self.snapshots if s.id == p.snapshot_id]
        self.snapshots.remove(snap)
        the_vm = next(v for v in self.vms if v.id == p.vm_id)
        # Listed in the opposite order of the VM's drives: pairing must go by identifier.
        drives = list(reversed(the_vm.disks))
        point = m.ReferencePoint(
            id="Microsoft:RP-0001",
            vm_id=p.vm_id,
            type=m.RCT_REFERENCE_POINT,
            consistency_level=2,
            disk_ids=[d.instance_id for d in drives],
            rct_ids=[f"rctX:{d.controller_number}:{d.controller_location}:00000001" for d in drives],
        )
        self.points.append(point)
        return point

    def _list_reference_points(self, p: m.VmParams) -> list[m.ReferencePoint]:
        return [r for r in self.points if r.vm_id == p.vm]

    def _destroy_reference_point(self, p: m.ReferencePointParams) -> m.Removed:
        before = len(self.points)
        self.points = [r for r in self.points if r.id != p.reference_point_id]
        return m.Removed(removed=len(self.points) < before)

    def _disk_changes(self, p: m.DiskChangesParams) -> m.DiskChanges:
        assert self.changes is not None
        return self.changes(p)


def host_error(message: str, code: int | None, operation: str = "Msvm_ConcreteJob") -> HostError:
    return HostError(host=HOST, operation=operation, message=message, code=code)


def provider(host: FakeHost, **kw: Any) -> HyperVProvider:
    return HyperVProvider(runner=host, host=HOST, **kw)


# ---- host, inventory, configuration ----------------------------------------------------------------


async def test_check_host_refuses_older_than_2016_and_caches() -> None:
    host = FakeHost(info=host_info(build=9600))
    p = provider(host)
    with pytest.raises(FailedPrecondition, match=r"build 9600.*Windows Server 2016 \(build 14393\) or later"):
        await p.check_host()
    with pytest.raises(FailedPrecondition):
        await p.check_host()
    assert len(host.called("host_info")) == 1
    ok = FakeHost(info=host_info(build=14393))
    await provider(ok).check_host()


async def test_list_vms_names_disks_by_slot_with_details() -> None:
    host = FakeHost(
        vms=[vm(disks=[disk("IDE", 0, 0, fmt="VHD"), disk("SCSI", 0, 1), disk("SCSI", 1, 3, fmt="VHDSet")])]
    )
    (info,) = await provider(host).list_vms()
    assert [(d.disk_id, d.format, d.size) for d in info.disks] == [
        ("ide0-0", DiskFormat.VHD, 10 * MiB),
        ("scsi0-1", DiskFormat.VHDX, 10 * MiB),
    ]
    for d in info.disks:
        check_name("disk_id", d.disk_id)
    assert info.disks[1].locator == "D:\\VMs\\web\\scsi01_5F4C.avhdx"
    details = dict(info.details)
    assert info.state == "Running" and info.host == HOST
    assert details["generation"] == "2" and details["version"] == "9.0" and details["processors"] == "4"
    assert details["secure_boot"] == "on (MicrosoftWindows)"
    assert details["memory"] == "4096 MiB (dynamic 512 MiB..8192 MiB)"
    assert details["nics"] == "Network Adapter: LAN 00155D010203"
    assert details["rct"] == "yes; not for ide0-0, scsi1-3 (not VHDX)"
    assert details["unreadable_disks"] == "scsi1-3 (VHD Set)"


async def test_rct_status_says_why_not() -> None:
    old = FakeHost(info=host_info(build=9600))
    (info,) = await provider(old).list_vms()
    assert dict(info.details)["rct"].startswith("no: host older than Windows Server 2016")
    low = FakeHost(vms=[vm(version="7.0")])
    (info,) = await provider(low).list_vms()
    assert dict(info.details)["rct"].startswith("uncertain: configuration version 7.0 is below 8.0")


async def test_get_vm_by_id_or_name() -> None:
    host = FakeHost(vms=[vm(), vm(vm_id=OTHER_ID, name="db")])
    p = provider(host)
    assert (await p.get_vm(VM_ID.lower())).vm_id == VM_ID
    assert (await p.get_vm("db")).vm_id == OTHER_ID
    with pytest.raises(NotFound, match="no VM with id or name 'mail'"):
        await p.get_vm("mail")


async def test_get_vm_out_of_bounds_ref_is_an_invalid_argument() -> None:
    host = FakeHost()
    with pytest.raises(InvalidArgument, match="vm: String should have at most 256 characters"):
        await provider(host).get_vm("x" * 300)
    assert host.calls == []


async def test_get_vm_ambiguous_name_refused_naming_both_ids() -> None:
    host = FakeHost(vms=[vm(), vm(vm_id=OTHER_ID, name="web")])
    with pytest.raises(FailedPrecondition, match=f"2 VMs named 'web'.*{VM_ID}.*{OTHER_ID}"):
        await provider(host).get_vm("web")
    # By id there is no ambiguity.
    assert (await provider(host).get_vm(OTHER_ID)).vm_id == OTHER_ID


async def test_get_vm_refuses_host_answer_for_another_vm() -> None:
    host = FakeHost()
    host._get_vm = lambda p: [vm(vm_id=OTHER_ID, name="db")]  # type: ignore[method-assign]
    with pytest.raises(HostOutputError, match="do not match"):
        await provider(host).get_vm("web")


async def test_two_drives_in_one_slot_refused() -> None:
    host = FakeHost(vms=[vm(disks=[disk("SCSI", 0, 0), disk("SCSI", 0, 0)])])
    with pytest.raises(HostOutputError, match="two drives at scsi0-0"):
        await provider(host).list_vms()


async def test_vm_configuration_is_canonical_json_of_what_failover_needs() -> None:
    host = FakeHost(
        vms=[vm(disks=[disk("SCSI", 0, 1), disk("IDE", 0, 0)]).model_copy(update={"notes": "sa pw: hunter2"})]
    )
    raw = await provider(host).vm_configuration(VM_ID)
    assert b"hunter2" not in raw  # notes stay out: restore points, configuration included, are shown to readers
    doc = json.loads(raw)
    assert raw == json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    cfg = doc["vm"]
    assert (cfg["generation"], cfg["version"], cfg["processors"]) == (2, "9.0", 4)
    assert cfg["firmware"] == {"secure_boot": True, "secure_boot_template": "MicrosoftWindows"}
    assert cfg["memory"] == {"startup": 4 * GiB, "dynamic": True, "minimum": 512 * MiB, "maximum": 8 * GiB}
    assert cfg["nics"] == [
        {"name": "Network Adapter", "switch": "LAN", "mac": "00155D010203", "dynamic_mac": False, "vlan_id": None}
    ]
    assert [d["disk_id"] for d in cfg["disks"]] == ["ide0-0", "scsi0-1"]
    assert cfg["disks"][1] == {
        "disk_id": "scsi0-1",
        "controller_type": "SCSI",
        "controller_number": 0,
        "controller_location": 1,
        "file_name": "scsi01.vhdx",
        "format": "VHDX",
        "type": "Differencing",
        "size": 10 * MiB,
        "block_size": 32 * MiB,
        "logical_sector_size": 512,
    }
    assert doc["host"]["os_build"] == 17763 and doc["host"]["supported_versions"] == ["8.0", "9.0"]


# ---- checkpoints -----------------------------------------------------------------------------------


async def test_crash_checkpoint_pairs_frozen_disks_by_instance_id() -> None:
    host = FakeHost()  # the snapshot lists its disks in the opposite order of the VM's drives
    cp = await provider(host).create_checkpoint(VM_ID)
    (params,) = host.called("create_checkpoint")
    assert params.name.startswith("vmrepl-") and params.consistency_level == 2 and params.guest_backup_type == 2
    assert cp.consistency is Consistency.CRASH and cp.fallback_reason == "" and cp.reference == ""
    # The InstanceID's GUID: sessions, tickets and the target carry checkpoint ids as plain names.
    assert cp.checkpoint_id == SNAP_GUID.upper() and cp.vm_id == VM_ID
    assert [(d.disk_id, d.locator, d.format) for d in cp.disks] == [
        ("scsi0-0", "D:\\VMs\\web\\scsi00_5F4C_frozen.vhdx", DiskFormat.VHDX),
        ("scsi0-1", "D:\\VMs\\web\\scsi01_5F4C_frozen.vhdx", DiskFormat.VHDX),
    ]


async def test_application_checkpoint_and_log_truncation() -> None:
    host = FakeHost()
    cp = await provider(host).create_checkpoint(VM_ID, CheckpointRequest(application=True, truncate_logs=True))
    (params,) = host.called("create_checkpoint")
    assert params.consistency_level == 1 and params.guest_backup_type == 1
    assert cp.consistency is Consistency.APPLICATION and cp.fallback_reason == ""


async def test_application_checkpoint_falls_back_to_crash_with_the_hosts_reason() -> None:
    host = FakeHost(fail={"create_checkpoint": [host_error("The guest's VSS writer failed.", 32768)]})
    cp = await provider(host).create_checkpoint(VM_ID, CheckpointRequest(application=True))
    attempts = host.called("create_checkpoint")
    assert [p.consistency_level for p in attempts] == [1, 2]
    assert attempts[0].name != attempts[1].name and attempts[1].name.startswith("vmrepl-")
    assert cp.consistency is Consistency.CRASH
    assert "The guest's VSS writer failed." in cp.fallback_reason and "32768" in cp.fallback_reason


async def test_application_checkpoint_required_refuses_the_fallback() -> None:
    host = FakeHost(fail={"create_checkpoint": [host_error("The guest's VSS writer failed.", 32768)]})
    with pytest.raises(HostError, match="required by the job: The guest's VSS writer failed") as e:
        await provider(host).create_checkpoint(VM_ID, CheckpointRequest(application=True, required=True))
    assert e.value.code == 32768 and e.value.host == HOST
    assert len(host.called("create_checkpoint")) == 1


async def test_crash_checkpoint_failure_is_a_host_error() -> None:
    host = FakeHost(fail={"create_checkpoint": [host_error("VM busy", 32774)]})
    with pytest.raises(HostError, match="VM busy"):
        await provider(host).create_checkpoint(VM_ID)


@pytest.mark.parametrize(
    ("the_vm", "why"),
    [
        (vm(unsupported_disks=["Passthrough Disk 2"]), "Passthrough Disk 2: pass-through"),
        (vm(disks=[disk("SCSI", 0, 0), disk("SCSI", 0, 1, fmt="VHDSet")]), "scsi0-1: VHD Set"),
        (vm(disks=[]), "no virtual hard disk"),
    ],
)
async def test_uncheckpointable_vm_refused_before_the_host_is_asked(the_vm: m.Vm, why: str) -> None:
    host = FakeHost(vms=[the_vm])
    with pytest.raises(FailedPrecondition, match=why):
        await provider(host).create_checkpoint(VM_ID)
    assert host.called("create_checkpoint") == []


async def test_checkpoint_on_old_host_refused() -> None:
    host = FakeHost(info=host_info(build=9600))
    with pytest.raises(FailedPrecondition, match="2016"):
        await provider(host).create_checkpoint(VM_ID)
    assert host.called("create_checkpoint") == []


async def test_checkpoint_missing_a_drive_is_refused_and_removed() -> None:
    host = FakeHost()
    create = host._create_checkpoint

    def drop_one(p: m.CreateCheckpointParams) -> m.Snapshot:
        snap = create(p)
        host.snapshots[-1] = short = snap.model_copy(update={"disks": snap.disks[:1]})
        return short

    host._create_checkpoint = drop_one  # type: ignore[method-assign]
    with pytest.raises(HostOutputError, match="does not match the VM's drives"):
        await provider(host).create_checkpoint(VM_ID)
    assert len(host.called("remove_checkpoint")) == 1 and host.snapshots == []


def snapshot(name: str, type_: str = m.RECOVERY_SNAPSHOT, sid: str = "Microsoft:S1") -> m.Snapshot:
    return m.Snapshot(id=sid, vm_id=VM_ID, name=name, type=type_, created=datetime(2026, 1, 1, tzinfo=UTC), disks=[])


def test_a_checkpoint_id_is_the_snapshots_guid_and_nothing_else_is_taken() -> None:
    guid = "5E07933D-A1DB-45B5-85EA-636912D2BDC3"
    assert checkpoint_name(f"Microsoft:{guid.lower()}", "hv") == guid
    assert snapshot_instance(guid) == f"Microsoft:{guid}"
    for bad in ("Microsoft:../x", guid, f"Microsoft:{guid}\\x", "Other:" + guid, ""):
        with pytest.raises(HostOutputError):
            checkpoint_name(bad, "hv")


async def test_list_checkpoints_returns_only_vmreplS_and_logs_the_others_once() -> None:
    host = FakeHost()
    p = provider(host)
    ours = await p.create_checkpoint(VM_ID)
    host.snapshots += [
        snapshot("nightly", "Microsoft:Hyper-V:Snapshot:Realized", "Microsoft:U1"),
        snapshot("Veeam_Recovery", m.RECOVERY_SNAPSHOT, "Microsoft:V1"),
        snapshot("vmrepl-user-made", "Microsoft:Hyper-V:Snapshot:Realized", "Microsoft:U2"),
    ]
    with capture_logs() as logs:
        first = await p.list_checkpoints(VM_ID)
        second = await p.list_checkpoints(VM_ID)
    assert [c.checkpoint_id for c in first] == [ours.checkpoint_id] == [c.checkpoint_id for c in second]
    assert first[0].disks == ours.disks
    left = [e["checkpoint_id"] for e in logs if e["event"] == "checkpoint_not_vmrepls_left_alone"]
    assert sorted(left) == ["Microsoft:U1", "Microsoft:U2", "Microsoft:V1"]


async def test_remove_checkpoint_is_idempotent_and_leaves_others_alone() -> None:
    host = FakeHost()
    p = provider(host)
    cp = await p.create_checkpoint(VM_ID)
    await p.remove_checkpoint(VM_ID, cp.checkpoint_id)
    await p.remove_checkpoint(VM_ID, cp.checkpoint_id)
    assert host.snapshots == [] and len(host.called("remove_checkpoint")) == 1
    user = "0E0E0E0E-1111-2222-3333-444444444444"
    host.snapshots.append(snapshot("nightly", "Microsoft:Hyper-V:Snapshot:Realized", f"Microsoft:{user}"))
    with pytest.raises(FailedPrecondition, match="not vmrepl's"):
        await p.remove_checkpoint(VM_ID, user)
    assert len(host.snapshots) == 1


# ---- reference points ------------------------------------------------------------------------------


async def kept(host: FakeHost, p: HyperVProvider) -> tuple[Checkpoint, str]:
    cp = await p.create_checkpoint(VM_ID)
    k = await p.keep_reference(cp)
    assert k.checkpoint_removed
    return cp, k.reference


async def test_keep_reference_pairs_rct_ids_by_virtual_disk_identifiers() -> None:
    host = FakeHost()
    p = provider(host)
    cp, reference = await kept(host, p)
    assert host.snapshots == []  # the conversion removed the checkpoint; nothing else is asked to
    assert host.called("remove_checkpoint") == []
    doc = json.loads(reference)
    assert reference == json.dumps(doc, sort_keys=True, separators=(",", ":"))
    assert doc == {
        "v": 1,
        "rp": "Microsoft:RP-0001",
        "vm": VM_ID,
        "d": {"scsi0-0": ["rctX:0:0:00000001", 10 * MiB], "scsi0-1": ["rctX:0:1:00000001", 10 * MiB]},
    }
    assert cp.reference == ""


async def test_keep_reference_leaves_out_disks_without_rct_id() -> None:
    host = FakeHost()
    convert = host._convert_checkpoint

    def no_rct_for_second(p: m.SnapshotParams) -> m.ReferencePoint:
        rp = convert(p)
        rct = [r if i == 0 else "" for i, r in enumerate(rp.rct_ids)]  # disk_ids[0] is scsi0-1 (reversed)
        return rp.model_copy(update={"rct_ids": rct})

    host._convert_checkpoint = no_rct_for_second  # type: ignore[method-assign]
    _, reference = await kept(host, provider(host))
    assert set(rf.parse(reference).disks) == {"scsi0-1"}


async def test_keep_reference_with_unequal_arrays_keeps_the_point_only() -> None:
    host = FakeHost()
    convert = host._convert_checkpoint
    host._convert_checkpoint = lambda p: convert(p).model_copy(update={"rct_ids": ["rctX:1"]})  # type: ignore[method-assign]
    _, reference = await kept(host, provider(host))
    ref = rf.parse(reference)
    assert ref.reference_point_id == "Microsoft:RP-0001" and dict(ref.disks) == {}


async def test_reference_for_eight_disks_is_well_under_the_limit() -> None:
    drives = [disk("SCSI", c, loc, size=64 * GiB) for c in range(2) for loc in range(4)]
    host = FakeHost(vms=[vm(disks=drives)])
    convert = host._convert_checkpoint
    host._convert_checkpoint = lambda p: convert(p).model_copy(  # type: ignore[method-assign]
        update={"rct_ids": [f"rctX:5bfde23b:ce75:4303:b54f:6c18394f105{i}:00000001" for i in range(8)]}
    )
    _, reference = await kept(host, provider(host))
    assert len(rf.parse(reference).disks) == 8
    assert len(reference.encode()) < 1024


async def test_reference_too_long_for_the_limit_keeps_the_disks_that_fit() -> None:
    drives = [disk("SCSI", c, loc) for c in range(4) for loc in range(16)]
    host = FakeHost(vms=[vm(disks=drives)])
    convert = host._convert_checkpoint
    host._convert_checkpoint = lambda p: convert(p).model_copy(  # type: ignore[method-assign]
        update={"rct_ids": [f"rctX:{'0' * 60}:{i:08x}" for i in range(64)]}
    )
    with capture_logs() as logs:
        _, reference = await kept(host, provider(host))
    kept_disks = rf.parse(reference).disks
    assert len(reference.encode()) <= rf.REFERENCE_LIMIT and 10 < len(kept_disks) < 64
    assert len([e for e in logs if e["event"] == "rct_id_not_kept"]) == 64 - len(kept_disks)


async def test_drop_reference_destroys_the_point_idempotently() -> None:
    host = FakeHost()
    p = provider(host)
    _, reference = await kept(host, p)
    await p.drop_reference(VM_ID, reference)
    await p.drop_reference(VM_ID, reference)
    assert host.points == []
    assert [c.reference_point_id for c in host.called("destroy_reference_point")] == ["Microsoft:RP-0001"] * 2


@pytest.mark.parametrize(
    "bad", ["", "not json", '{"v":2,"rp":"x","vm":"y","d":{}}', '{"v":1,"rp":"x","vm":"y","d":{"../x":["r",1]}}']
)
async def test_drop_reference_ignores_a_malformed_reference(bad: str) -> None:
    host = FakeHost()
    with capture_logs() as logs:
        await provider(host).drop_reference(VM_ID, bad)
    assert host.called("destroy_reference_point") == []
    assert [e["event"] for e in logs] == ["reference_not_dropped"]


async def test_drop_reference_of_another_vm_is_ignored() -> None:
    host = FakeHost()
    other = rf.encode(rf.RctReference("Microsoft:RP-9", OTHER_ID, {}))
    await provider(host).drop_reference(VM_ID, other)
    assert host.called("destroy_reference_point") == []


# ---- changed ranges --------------------------------------------------------------------------------

LIMITS = ChangeLimits(chunk=MiB, window=4 * MiB, max_ranges=100)


def changes_from(writes: list[Extent], step: int) -> Callable[[m.DiskChangesParams], m.DiskChanges]:
    """A host that covers at most `step` bytes per call and reports the writes that start in what it covered."""

    def answer(p: m.DiskChangesParams) -> m.DiskChanges:
        processed = min(p.length, step)
        ranges = [
            m.ChangedRange(offset=w.offset, length=w.length)
            for w in writes
            if p.offset <= w.offset < p.offset + processed
        ]
        return m.DiskChanges(processed=processed, ranges=ranges, stalled=False)

    return answer


async def session(host: FakeHost, **kw: Any) -> tuple[HyperVProvider, Checkpoint, str]:
    p = provider(host, change_limits=LIMITS, **kw)
    _, reference = await kept(host, p)
    cp = await p.create_checkpoint(VM_ID)
    return p, cp, reference


async def test_changed_ranges_loops_over_partial_processed_lengths() -> None:
    writes = [Extent(0, 4096), Extent(4096, 4096), Extent(3 * MiB, MiB), Extent(10 * MiB - 512, 512)]
    host = FakeHost(changes=changes_from(writes, step=3 * MiB))
    p, cp, reference = await session(host)
    ranges = await p.changed_ranges(cp, "scsi0-1", reference)
    assert ranges == [Extent(0, 8192), Extent(3 * MiB, MiB), Extent(10 * MiB - 512, 512)]
    calls = host.called("disk_changes")
    assert [(c.offset, c.length) for c in calls] == [
        (0, 4 * MiB),
        (3 * MiB, 4 * MiB),
        (6 * MiB, 4 * MiB),
        (9 * MiB, MiB),
    ]
    assert {c.limit_id for c in calls} == {"rctX:0:1:00000001"}
    assert {c.path for c in calls} == {"D:\\VMs\\web\\scsi01_5F4C_frozen.vhdx"}
    assert {(c.chunk, c.max_ranges) for c in calls} == {(MiB, 100)}


async def test_changed_ranges_stall_is_untracked_not_a_spin() -> None:
    host = FakeHost(changes=lambda p: m.DiskChanges(processed=0, ranges=[], stalled=True))
    p, cp, reference = await session(host)
    result = await p.changed_ranges(cp, "scsi0-0", reference)
    assert isinstance(result, Untracked) and "stalled at offset 0" in result.reason
    assert len(host.called("disk_changes")) == 1


async def test_changed_ranges_zero_progress_without_the_flag_is_a_stall() -> None:
    step = itertools.chain([MiB], itertools.repeat(0))
    host = FakeHost(changes=lambda p: m.DiskChanges(processed=next(step), ranges=[], stalled=False))
    p, cp, reference = await session(host)
    result = await p.changed_ranges(cp, "scsi0-0", reference)
    assert isinstance(result, Untracked) and f"stalled at offset {MiB}" in result.reason


def wrote(*ranges: tuple[int, int], processed: int | None = None) -> Callable[[m.DiskChangesParams], m.DiskChanges]:
    def answer(p: m.DiskChangesParams) -> m.DiskChanges:
        rs = [m.ChangedRange(offset=o, length=n) for o, n in ranges]
        return m.DiskChanges(processed=p.length if processed is None else processed, ranges=rs, stalled=False)

    return answer


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (wrote((10 * MiB - 512, 1024)), "changed range past the end of the disk"),
        (wrote((2**64 - 1, 2**63)), "changed range past the end of the disk"),
        (wrote(processed=5 * MiB), "5242880 bytes processed of a 4194304-byte window"),
    ],
)
async def test_bad_host_output_is_untracked(answer: Callable[[m.DiskChangesParams], m.DiskChanges], why: str) -> None:
    host = FakeHost(changes=answer)
    p, cp, reference = await session(host)
    result = await p.changed_ranges(cp, "scsi0-0", reference)
    assert isinstance(result, Untracked) and why in result.reason


async def test_get_virtual_disk_changes_failure_is_untracked_with_code() -> None:
    host = FakeHost(
        fail={
            "disk_changes": [
                host_error(
                    "The system cannot find the file.", 32779, "Msvm_ImageManagementService.GetVirtualDiskChanges"
                )
            ]
        }
    )
    p, cp, reference = await session(host)
    result = await p.changed_ranges(cp, "scsi0-0", reference)
    assert result == Untracked(
        "GetVirtualDiskChanges failed for disk scsi0-0: The system cannot find the file. (code 32779)"
    )


async def test_vanished_reference_point_is_untracked() -> None:
    host = FakeHost(changes=wrote())
    p, cp, reference = await session(host)
    host.points.clear()
    result = await p.changed_ranges(cp, "scsi0-0", reference)
    assert result == Untracked(f"reference point Microsoft:RP-0001 is gone from host {HOST}")
    assert host.called("disk_changes") == []


def with_disk(cp: Checkpoint, disk_id: str, **change: Any) -> Checkpoint:
    disks = tuple(
        DiskInCheckpoint(
            disk_id=d.disk_id,
            locator=d.locator,
            format=change.get("format", d.format),
            size=change.get("size", d.size),
        )
        if d.disk_id == disk_id
        else d
        for d in cp.disks
    )
    return Checkpoint(cp.checkpoint_id, cp.vm_id, cp.created_at, cp.reference, disks)


async def test_each_reason_the_host_cannot_say() -> None:
    host = FakeHost(changes=wrote())
    p, cp, reference = await session(host)
    other_vm = rf.encode(rf.RctReference("Microsoft:RP-0001", OTHER_ID, {}))
    no_disk = rf.encode(rf.RctReference("Microsoft:RP-0001", VM_ID, {}))
    cases = [
        (cp, "scsi0-0", "garbage", "RCT reference unreadable"),
        (cp, "scsi0-0", "", "RCT reference unreadable: the reference is empty"),
        (cp, "scsi0-0", other_vm, f"VM {OTHER_ID}'s, not this VM's"),
        (cp, "scsi0-0", no_disk, "kept no RCT id for disk scsi0-0"),
        (cp, "scsi9-9", reference, "disk scsi9-9 is not in checkpoint"),
        (with_disk(cp, "scsi0-0", format=DiskFormat.VHD), "scsi0-0", reference, "is a VHD file, not VHDX"),
        (with_disk(cp, "scsi0-0", size=20 * MiB), "scsi0-0", reference, "changed size since the reference"),
    ]
    for checkpoint, disk_id, since, why in cases:
        result = await p.changed_ranges(checkpoint, disk_id, since)
        assert isinstance(result, Untracked) and why in result.reason, (why, result)
    assert host.called("disk_changes") == []


async def test_old_host_is_untracked() -> None:
    host = FakeHost(changes=wrote())
    _, cp, reference = await session(host)
    old = HyperVProvider(runner=FakeHost(info=host_info(build=9600)), host=HOST)
    result = await old.changed_ranges(cp, "scsi0-0", reference)
    assert isinstance(result, Untracked) and "older than Windows Server 2016" in result.reason


async def test_changed_ranges_never_raises_for_a_host_error() -> None:
    host = FakeHost(changes=wrote())
    p, cp, reference = await session(host)
    host.fail["list_reference_points"] = [host_error("Access denied", 32769, "Get-CimAssociatedInstance")]
    result = await p.changed_ranges(cp, "scsi0-0", reference)
    assert isinstance(result, Untracked) and "Access denied (code 32769)" in result.reason


async def test_too_many_calls_is_untracked() -> None:
    host = FakeHost(changes=wrote(processed=512))
    p = provider(host, change_limits=ChangeLimits(chunk=MiB, window=4 * MiB, max_calls=3))
    _, reference = await kept(host, p)
    cp = await p.create_checkpoint(VM_ID)
    result = await p.changed_ranges(cp, "scsi0-0", reference)
    assert isinstance(result, Untracked) and "more than 3 GetVirtualDiskChanges calls" in result.reason
    assert len(host.called("disk_changes")) == 3
