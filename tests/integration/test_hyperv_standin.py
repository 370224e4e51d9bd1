"""The Hyper-V host stand-in (tests/support/hyperv) through the unmodified pywinrm `Protocol`, with the
client's calling convention: one shell per script (code page 65001, VMREPL_PARAMS in its environment),
`powershell.exe -NoProfile -NonInteractive -Command -`, the script's exact text on stdin, `read_envelope`."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from winrm.protocol import Protocol

from controller import lab
from tests.support.hyperv import faults
from tests.support.hyperv.lab import HyperVLab, hyperv_lab
from tests.support.hyperv.model import JobPolicy
from tests.support.hyperv.serve import ControlClient
from vmrepl.disk.vhdx import VhdxReader
from vmrepl.errors import HostError
from vmrepl.extent import MiB
from vmrepl.providers.hyperv import models as m
from vmrepl.providers.hyperv import scripts
from vmrepl.providers.hyperv.envelope import read_envelope

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

DISK = "C:\\Hyper-V\\Virtual Hard Disks\\web01.vhdx"
PS_ARGS = ["-NoProfile", "-NonInteractive", "-Command", "-"]


def call(p: Protocol, name: str, params: BaseModel) -> tuple[bytes, bytes, int]:
    env = {"VMREPL_PARAMS": base64.b64encode(params.model_dump_json().encode()).decode()}
    shell_id = p.open_shell(codepage=65001, env_vars=env)
    command_id = p.run_command(shell_id, "powershell.exe", PS_ARGS)
    p.send_command_input(shell_id, command_id, scripts.text(name).encode("utf-8"), end=True)
    out = p.get_command_output(shell_id, command_id)
    p.cleanup_command(shell_id, command_id)
    p.close_shell(shell_id)
    return out


def result(p: Protocol, name: str, params: BaseModel) -> Any:
    out, _err, rc = call(p, name, params)
    value = read_envelope(out, scripts.SCRIPTS[name].result)
    assert rc == 0
    return value


def client(lab_: HyperVLab) -> Protocol:
    return Protocol(
        endpoint=lab_.url,
        transport="basic" if lab_.auth == "basic" else "ntlm",
        username=lab_.username,
        password=lab_.password,
        server_cert_validation="validate",
        # Plain HTTP for NTLM: no CA at all, as vmrepl's client passes (pywinrm's "legacy_requests" default reads
        # REQUESTS_CA_BUNDLE and warns that it will stop doing so; its annotation omits None, which it accepts).
        ca_trust_path=str(lab_.ca_bundle) if lab_.ca_bundle else None,  # type: ignore[arg-type]
        message_encryption="auto" if lab_.auth == "basic" else "always",
        operation_timeout_sec=5,
        read_timeout_sec=10,
    )


@pytest.fixture
def standin(tmp_path: Path, lab_certs: lab.LabCerts) -> Iterator[HyperVLab]:
    with hyperv_lab(tmp_path / "host", certs=lab_certs.directory, stream_chunk=200, streams_per_receive=2) as lab_:
        yield lab_
    assert lab_.server.handler_errors == []


def test_checkpoint_reference_point_and_changes_over_https(standin: HyperVLab) -> None:
    host = standin.host
    vm = host.add_vm("wéb01 测试", disks=[(DISK, 32 * MiB)])
    host.write(vm.id, 0, 0, b"A" * MiB)
    p = client(standin)

    info = result(p, "host_info", m.NoParams())
    assert info.os_build == 17763 and "9.0" in info.supported_versions
    [found] = result(p, "get_vm", m.VmParams(vm="wéb01 测试"))
    assert found.id == vm.id.lower() and found.disks[0].path == DISK and found.disks[0].type == "Dynamic"

    cp = m.CreateCheckpointParams(
        vm_id=found.id, name="vmrepl-1", consistency_level=1, guest_backup_type=2, timeout_seconds=10
    )
    snap = result(p, "create_checkpoint", cp)
    host.write(vm.id, 0, 4 * MiB, b"B" * 4096)  # after the freeze
    assert snap.disks[0].path == DISK
    with VhdxReader(standin.drives / "C" / "Hyper-V" / "Virtual Hard Disks" / "web01.vhdx") as r:
        head = bytearray(MiB)
        r.read_into(memoryview(head), 0)
        assert bytes(head) == b"A" * MiB
    [now] = result(p, "get_vm", m.VmParams(vm=found.id))
    assert now.disks[0].type == "Differencing" and now.disks[0].parent_chain == [DISK]

    host.job_policy = JobPolicy(asynchronous=False)  # ConvertToReferencePoint answers 0 with the out reference
    rp = result(p, "convert_checkpoint", m.SnapshotParams(vm_id=found.id, snapshot_id=snap.id, timeout_seconds=10))
    assert result(p, "list_checkpoints", m.VmParams(vm=found.id)) == []
    assert [r.id for r in result(p, "list_reference_points", m.VmParams(vm=found.id))] == [rp.id]
    assert host.calls == ["CreateSnapshot", "ConvertToReferencePoint"]
    host.job_policy = JobPolicy(asynchronous=True, polls=3)
    host.write(vm.id, 0, 8 * MiB, b"C" * 512)
    snap2 = result(p, "create_checkpoint", cp.model_copy(update={"name": "vmrepl-2"}))
    changes = result(
        p,
        "disk_changes",
        m.DiskChangesParams(
            path=snap2.disks[0].path,
            limit_id=rp.rct_ids[rp.disk_ids.index(found.disks[0].instance_id)],
            offset=0,
            length=32 * MiB,
            chunk=16 * MiB,
            max_ranges=100,
            timeout_seconds=10,
        ),
    )
    assert [(c.offset, c.length) for c in changes.ranges] == [(4 * MiB, 4096), (8 * MiB, 512)]
    gone = m.SnapshotParams(vm_id=found.id, snapshot_id=snap2.id, timeout_seconds=10)
    assert result(p, "remove_checkpoint", gone) == m.Removed(removed=True)
    assert result(p, "remove_checkpoint", gone) == m.Removed(removed=False)
    assert host.read(vm.id, 0, 4 * MiB, 4096) == b"B" * 4096


def test_error_envelope_and_clixml_progress(standin: HyperVLab) -> None:
    vm = standin.host.add_vm("db01", disks=[("D:\\VMs\\db01.vhdx", 8 * MiB)])
    standin.host.add_fault(faults.vm_busy("CreateSnapshot", 32775))
    p = client(standin)
    out, err, rc = call(p, "host_info", m.NoParams())
    assert rc == 0 and err.startswith(b"#< CLIXML\r\n") and read_envelope(out, m.HostInfo).name == "HV01"
    cp = m.CreateCheckpointParams(
        vm_id=vm.id, name="vmrepl-1", consistency_level=2, guest_backup_type=2, timeout_seconds=5
    )
    out, err, rc = call(p, "create_checkpoint", cp)
    assert rc == 1
    with pytest.raises(HostError) as raised:
        read_envelope(out, m.Snapshot)
    assert (raised.value.operation, raised.value.code) == ("Msvm_VirtualSystemSnapshotService.CreateSnapshot", 32775)


def test_ntlm_encrypted(tmp_path: Path) -> None:
    with hyperv_lab(tmp_path / "host", auth="ntlm") as lab_:
        lab_.host.add_vm("web01", disks=[(DISK, 8 * MiB)])
        assert [v.name for v in result(client(lab_), "list_vms", m.NoParams())] == ["web01"]
        assert lab_.server.refused_unencrypted == 0


def test_serve_process_with_control_endpoint(tmp_path: Path, lab_certs: lab.LabCerts) -> None:
    seed = tmp_path / "seed.json"
    doc = {"host": {"name": "HV02"}, "vms": [{"name": "web01", "disks": [[DISK, 8 * MiB]]}]}
    seed.write_text(json.dumps(doc))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.support.hyperv.serve",
            "--root",
            str(tmp_path / "host"),
            "--state",
            str(seed),
            "--certs",
            str(lab_certs.directory),
        ],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
        env=os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())
        ctl = ControlClient(ready["control"], ready["token"])
        vm_id = ctl("state")["state"]["vms"][0]["id"]
        ctl("write", vm=vm_id, disk=0, offset=MiB, length=4096, seed=3)
        ctl("fault", fault={"kind": "ReturnCode", "method": "CreateSnapshot", "code": 32769})
        p = Protocol(
            endpoint=ready["url"],
            transport="basic",
            username=ready["username"],
            password="stand-in lab password, not a secret",
            ca_trust_path=ready["ca"],
            operation_timeout_sec=5,
            read_timeout_sec=10,
        )
        [vm] = result(p, "get_vm", m.VmParams(vm="web01"))
        assert (
            vm.id == vm_id.lower() and read_envelope(call(p, "host_info", m.NoParams())[0], m.HostInfo).name == "HV02"
        )
        cp = m.CreateCheckpointParams(
            vm_id=vm.id, name="vmrepl-1", consistency_level=2, guest_backup_type=2, timeout_seconds=5
        )
        with pytest.raises(HostError) as raised:
            read_envelope(call(p, "create_checkpoint", cp)[0], m.Snapshot)
        assert raised.value.code == 32769
        assert result(p, "create_checkpoint", cp).name == "vmrepl-1"
        data = base64.b64decode(ctl("read", vm=vm_id, disk=0, offset=MiB, length=4096)["data"])
        assert data != bytes(4096)
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0
