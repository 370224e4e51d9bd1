"""The whole stack against a Hyper-V host: the controller, a proxy and a target as real processes, and the
Hyper-V host stand-in (tests/support/hyperv) serving the package's scripts over HTTPS to the controller's
unmodified pywinrm client. The proxy reads the host's `C:\\` through its host_paths mapping, as an off-host
proxy reads an SMB share."""

from __future__ import annotations

import random
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from controller import lab
from tests.integration.controller_env import ControllerEnv
from tests.support.controller_db import seed_controller_database
from tests.support.hyperv.lab import HyperVLab, hyperv_lab
from vmrepl.disk import open_reader
from vmrepl.domain import DiskFormat
from vmrepl.extent import MiB
from vmrepl.v1 import controller_pb2 as api

# A password no other text in the lab holds: found anywhere it must not be, it was leaked.
PASSWORD = "hv-Secret-7f3a9c1e-do-not-leak"
DISKS = [
    ("C:\\Hyper-V\\Virtual Hard Disks\\web01.vhdx", 24 * MiB),
    ("C:\\Hyper-V\\Virtual Hard Disks\\web01-data.vhdx", 8 * MiB),
]


@dataclass
class HyperVStack:
    ctl: ControllerEnv
    hv: HyperVLab
    vm_id: str

    def configure(self, *, job: str = "job1", **job_settings: Any) -> None:
        stub = self.ctl.client()
        stub.CreateTarget(
            api.CreateTargetRequest(target_id="target", target=api.Target(address=self.ctl.target.address))
        )
        stub.CreateProxy(api.CreateProxyRequest(proxy_id="proxy1", proxy=api.Proxy(address=self.ctl.proxy.address)))
        stub.CreateCredential(
            api.CreateCredentialRequest(
                credential_id="hvadmin", credential=api.Credential(username=self.hv.username), secret=PASSWORD
            )
        )
        if self.hv.auth == "ntlm":  # plain HTTP, every message sealed (what a host without HTTPS serves)
            winrm = api.WinRmSettings(scheme="http", port=self.hv.port, auth="ntlm")
        else:
            winrm = api.WinRmSettings(port=self.hv.port, auth="basic", ca_bundle=str(self.hv.ca_bundle))
        host = api.Host(provider="hyperv", address="localhost", credential="credentials/hvadmin", winrm=winrm)
        stub.CreateHost(api.CreateHostRequest(host_id="hv01", host=host))
        spec = api.Job(host="hosts/hv01", target="targets/target", replica_root=job, vms=[api.JobVm(vm="web01")])
        for k, v in job_settings.items():
            field = getattr(spec, k)
            if hasattr(field, "CopyFrom"):
                field.CopyFrom(v)
            else:
                setattr(spec, k, v)
        stub.CreateJob(api.CreateJobRequest(job_id=job, job=spec))

    def replica(self, disk_id: str, job: str = "job1") -> Path:
        return self.ctl.work / "datastore" / job / self.vm_id / "disks" / disk_id / "data.vhdx"

    def assert_replica_is_the_vm(self, job: str = "job1") -> None:
        """Every disk's replica equals what the guest sees now (no write since the session's checkpoint)."""
        for i, disk_id in enumerate(("scsi0-0", "scsi0-1")):
            with open_reader(DiskFormat.VHDX, self.replica(disk_id, job)) as r:
                got = bytearray(r.size)
                r.read_into(memoryview(got), 0)
            want = self.hv.host.read("web01", i)
            assert len(got) == len(want), f"{disk_id}: replica size {len(got)}, disk {len(want)}"
            if got != want:
                first = next(o for o in range(0, len(want), 4096) if got[o : o + 4096] != want[o : o + 4096])
                raise AssertionError(f"{disk_id}: replica differs from the VM's disk, first at offset {first}")

    def vmrepl_snapshots(self) -> list[str]:
        """This lab's vmrepl recovery checkpoints (a test may plant another installation's: vmrepl-0a0b0c0d-)."""
        return [
            s.name
            for s in self.hv.host.state.snapshots
            if s.name.startswith("vmrepl-") and not s.name.startswith("vmrepl-0a0b0c0d-")
        ]


def _mapping(drives: Path) -> dict[str, Any]:
    return {"host_paths": [{"host_prefix": "C:\\", "local": str(drives / "C")}]}


@contextmanager
def hyperv_stack(
    work: Path, certs: lab.LabCerts, *, auth: Literal["basic", "ntlm"] = "basic", **controller_settings: Any
) -> Iterator[HyperVStack]:
    with ExitStack() as stack:
        served = certs.directory if auth == "basic" else None  # NTLM is served over plain HTTP
        hv = stack.enter_context(hyperv_lab(work / "hvhost", certs=served, auth=auth, password=PASSWORD))
        vm = hv.host.add_vm("web01", disks=DISKS, generation=2, processors=2)
        rng = random.Random(5)
        for i, (_, size) in enumerate(DISKS):  # incompressible data in every other MiB, the rest zero
            for off in range(0, size, 2 * MiB):
                hv.host.write("web01", i, off, rng.randbytes(MiB))
        (hv.drives / "C").mkdir(parents=True, exist_ok=True)
        target = lab.AgentProcess("target_agent", lab.target_config(work, certs, level="debug"), work / "target.log")
        proxy_cfg = lab.proxy_config(
            work, certs, sources=hv.drives, batch_bytes=MiB, window_batches=4, **_mapping(hv.drives)
        )
        proxy = lab.AgentProcess("proxy_agent", proxy_cfg, work / "proxy.log")
        seed_controller_database(work / "controller")
        ctl_cfg = lab.controller_config(work, certs, **controller_settings)
        controller = lab.AgentProcess("controller", ctl_cfg, work / "controller.log")
        env = ControllerEnv(work, certs, hv.drives, target, proxy, controller)
        stack.callback(env.stop)
        lab.start_all([target, proxy, controller])
        yield HyperVStack(env, hv, vm.id.lower())


def qemu_compare(a: Path, b: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["qemu-img", "compare", "-f", "vhdx", "-F", "vhdx", str(a), str(b)], capture_output=True, text=True, check=False
    )
