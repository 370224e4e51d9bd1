"""`make demo`: replicate a sample VM end to end through the controller, on loopback with mTLS.

Creates the CA and certificates, starts a target, a proxy and the controller
(SQLite) as real processes, creates a sample VM on a file-backed host (GPT
disk: NTFS with files, and swap), configures them with the `vmrepl` CLI,
runs a full replication, writes to the VM, runs an incremental, shows the
sessions and restore points, and checks the replica with `qemu-img compare`.
Then it fails the VM over to the newest point (the target mounts it in its
vm_root, the failover file host's folder, and the VM runs there), writes to the
failed-over VM, undoes the failover and checks the replica did not change
(docs/failover.md). Everything lives in ./demo-run and is stopped at the end.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from controller import lab
from vmrepl.extent import MiB
from vmrepl.providers.filehost import FileHostProvider

SIZE = 256 * MiB


def _vmrepl(controller: str, certs: Path, *args: str) -> None:
    cmd = [sys.executable, "-m", "controller.cli", "--controller", controller, "--certs-dir", str(certs), *args]
    print(f"\n$ vmrepl {' '.join(args)}", flush=True)
    out = subprocess.run(cmd, check=False, env={**os.environ, "COLUMNS": os.environ.get("COLUMNS", "120")})
    if out.returncode != 0:
        raise SystemExit(f"demo failed: vmrepl {' '.join(args)} exited {out.returncode}")


def _compare(source: Path, replica: Path) -> None:
    out = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(source), str(replica)],
        capture_output=True,
        text=True,
        check=False,
    )
    print(f"qemu-img compare: {out.stdout.strip() or out.stderr.strip()}")
    if out.returncode != 0:
        raise SystemExit("demo failed: the replica differs from the source")


def main() -> None:
    for tool in ("qemu-img", "mkntfs", "ntfscp", "mkswap", "sfdisk"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is needed for the demo (Debian: apt-get install qemu-utils ntfs-3g fdisk)")
    work = Path("demo-run").resolve()
    shutil.rmtree(work, ignore_errors=True)
    host = work / "host"
    host.mkdir(parents=True)
    failover_root = work / "failover-host"  # the target's vm_root: failed-over VMs' folders
    failover_root.mkdir()
    certs = lab.LabCerts.create(work / "certs")
    print(f"CA and certificates in {certs.directory}")
    vm_dir = lab.create_sample_vm(host, "demo-vm", size=SIZE)
    print(f"sample VM {vm_dir} ({SIZE // MiB} MiB GPT disk: NTFS with files and a pagefile, swap)")
    target = lab.AgentProcess(
        "target_agent", lab.target_config(work, certs, vm_root=str(failover_root)), work / "target.log"
    )
    proxy = lab.AgentProcess("proxy_agent", lab.proxy_config(work, certs, sources=host), work / "proxy.log")
    controller = lab.AgentProcess("controller", lab.controller_config(work, certs), work / "controller.log")
    try:
        lab.start_all([target, proxy, controller])
        print(f"target {target.address}, proxy {proxy.address}, controller {controller.address} (mTLS, SQLite)")

        def run(*args: str) -> None:
            _vmrepl(controller.address, certs.directory, *args)

        run("infra", "target-add", "target", "--address", target.address)
        run("infra", "proxy-add", "proxy1", "--address", proxy.address)
        run("infra", "host-add", "lab", "--address", str(host))
        run("infra", "host-add", "dr", "--address", str(failover_root))
        run("job", "create", "demo", "--host", "lab", "--target", "target", "--vm", "demo-vm", "--keep", "3")
        run("job", "update", "demo", "--failover-host", "dr")
        run("job", "start", "demo", "--wait")
        run("lab", "write", str(host), "demo-vm", "--blocks", "12", "--seed", "7")
        run("job", "start", "demo", "--wait")
        run("session", "list")
        run("restore-points", "list", "demo")
        vm = FileHostProvider(host).vm("demo-vm")
        replica = work / "datastore" / "replicas" / "demo" / vm.manifest.id / "disks" / "disk0" / "data.raw"
        print()
        _compare(vm.image("disk0"), replica)
        print("replica is identical to the source")
        _failover_and_undo(run, failover_root)
        _compare(vm.image("disk0"), replica)
        print("the failover and what the failed-over VM wrote left the replica as it was")
    finally:
        for p in (controller, proxy, target):
            p.stop()


def _failover_and_undo(run: Callable[..., None], failover_root: Path) -> None:
    """The VM run from its newest point on the failover host, written to there, then the failover undone."""
    run("replica", "failover", "demo", "--vm", "demo-vm")
    run("replica", "show", "demo", "--vm", "demo-vm")
    run("lab", "write", str(failover_root), "demo-vm_replica", "--blocks", "4", "--seed", "8")
    run("replica", "undo-failover", "demo", "--vm", "demo-vm")
    print()


if __name__ == "__main__":
    main()
