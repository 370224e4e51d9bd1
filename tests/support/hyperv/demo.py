r"""`make demo-hyperv`: replicate a VM from the Hyper-V host stand-in, end to end through the controller.

Like `make demo` (controller/lab/demo.py), with the file host replaced by the WS-Management stand-in
(tests/support/hyperv/serve.py) as its own process: the controller reaches it with the real WinRM client
(Basic over HTTPS, the lab CA's certificate validated), and the proxy reads the disk files the recovery
checkpoints froze through a `host_paths` mapping of `C:\` to the stand-in's drives folder, as an off-host
proxy reads a Hyper-V host's disks through an SMB mount. The VM "web01" has two VHDX disks; the guest
writes through the stand-in's control endpoint. Two sessions run with the `vmrepl` CLI: a full one, then an
RCT incremental reading only the changed ranges. The replica's VHDX files are then compared with the VM's
disks by `qemu-img compare`, a reader independent of vmrepl's. Everything lives in ./demo-hyperv-run and is
stopped at the end.

It lives under tests/ because the stand-in does (controller/ never imports tests/).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from controller import lab
from tests.support.hyperv.serve import ControlClient
from tests.support.hyperv.state import windows_to_local
from vmrepl.extent import MiB

VM = "web01"
DISK_DIR = "C:\\Hyper-V\\Virtual Hard Disks"
DISKS = [(f"{DISK_DIR}\\web01.vhdx", 256 * MiB), (f"{DISK_DIR}\\web01-data.vhdx", 64 * MiB)]
# (disk index, offset, length, seed): what the guest wrote before the first session ...
FILL = [(0, 0, 24 * MiB, 1), (0, 100 * MiB, 16 * MiB, 2), (0, 250 * MiB, 6 * MiB, 3), (1, 8 * MiB, 20 * MiB, 4)]
# ... and between the two: a few scattered writes, some inside what was filled, one into a hole.
CHANGES = [(0, 4 * MiB, MiB, 11), (0, 108 * MiB + 4096, 64 * 1024, 12), (0, 180 * MiB, 2 * MiB, 13), (1, 0, MiB, 14)]
SECRET_ENV = "VMREPL_DEMO_WINRM_SECRET"


@contextmanager
def _standin(work: Path, certs: lab.LabCerts, password: str) -> Iterator[dict[str, Any]]:
    """The stand-in process, seeded with web01; yields the JSON line it printed when ready."""
    seed = work / "hyperv-seed.json"
    seed.write_text(
        json.dumps({"host": {"name": "HV01"}, "vms": [{"name": VM, "disks": DISKS, "generation": 2}]}),
        encoding="utf-8",
    )
    secret = work / "hyperv-password"
    secret.touch(mode=0o600)
    secret.write_text(password, encoding="utf-8")
    cmd = [sys.executable, "-m", "tests.support.hyperv.serve", "--root", str(work / "hyperv-host")]
    cmd += ["--state", str(seed), "--certs", str(certs.directory), "--password-file", str(secret)]
    with open(work / "hyperv-host.log", "ab") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, start_new_session=True)
    try:
        assert proc.stdout is not None  # we asked for the pipe
        line = proc.stdout.readline()
        if not line:
            raise SystemExit(f"demo failed: the stand-in exited {proc.wait()}; see {work / 'hyperv-host.log'}")
        yield json.loads(line)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _proxy_config(work: Path, certs: lab.LabCerts, drives: Path) -> Path:
    """The lab proxy's configuration with the host's C:\\ mapped to the stand-in's drives folder (TOML
    literal strings: a backslash is a backslash)."""
    path = lab.proxy_config(work, certs, sources=drives)
    mapping = f"host_paths = [{{host_prefix = 'C:\\', local = '{drives / 'C'}'}}]\n"
    path.write_text(mapping + path.read_text(encoding="utf-8"), encoding="utf-8")  # top-level keys first
    return path


def _guest_writes(control: ControlClient, writes: list[tuple[int, int, int, int]]) -> None:
    for disk, offset, length, seed in writes:
        control("write", vm=VM, disk=disk, offset=offset, length=length, seed=seed)
    print(f"guest wrote {sum(w[2] for w in writes) // 1024} KiB in {len(writes)} places on {VM}'s disks")


def _vmrepl(controller: str, certs: Path, *args: str, capture: bool = False) -> str:
    cmd = [sys.executable, "-m", "controller.cli", "--controller", controller, "--certs-dir", str(certs), *args]
    if not capture:
        print(f"\n$ vmrepl {' '.join(args)}", flush=True)
    env = {**os.environ, "COLUMNS": os.environ.get("COLUMNS", "120")}
    out = subprocess.run(cmd, check=False, env=env, capture_output=capture, text=True)
    if out.returncode != 0:
        raise SystemExit(f"demo failed: vmrepl {' '.join(args)} exited {out.returncode}\n{out.stderr or ''}")
    return out.stdout or ""


def _compare(work: Path, host: dict[str, Any]) -> None:
    """Each replica disk against the VM's disk file, both VHDX, read by qemu-img (not by vmrepl's reader).

    After the last session its checkpoint became a reference point, which merged the checkpoint's child
    into the base disk: the VM's disk is the single file at its path again, and nobody writes to it now."""
    state = ControlClient(host["control"], host["token"])("state")["state"]
    vm = next(v for v in state["vms"] if v["name"] == VM)
    drives = Path(host["drives"])
    # The VM's folder on the target is named by its id as the provider reports it (any case on the host).
    vm_dir = next(
        p for p in (work / "datastore" / "replicas" / "hv").iterdir() if p.name.casefold() == vm["id"].casefold()
    )
    for disk in vm["disks"]:
        if len(disk["chain"]) != 1:
            raise SystemExit(f"demo failed: {disk['chain'][-1]} is still a checkpoint's child")
        slot = f"{disk['controller_type'].lower()}{disk['controller_number']}-{disk['controller_location']}"
        source = windows_to_local(drives, disk["chain"][0])
        replica = vm_dir / "disks" / slot / "data.vhdx"
        out = subprocess.run(
            ["qemu-img", "compare", "-f", "vhdx", "-F", "vhdx", str(source), str(replica)],
            capture_output=True,
            text=True,
            check=False,
        )
        print(f"{slot}: qemu-img compare {source.name} {replica.relative_to(work)}: {out.stdout.strip() or out.stderr}")
        if out.returncode != 0:
            raise SystemExit(f"demo failed: the replica of {VM}/{slot} differs from the VM's disk")


def _last_session(run: Any) -> str:
    sessions = json.loads(run("session", "list", "--job", "hv", "--json", capture=True))["sessions"]
    return str(sessions[0]["name"]).removeprefix("sessions/")


def main() -> None:
    if shutil.which("qemu-img") is None:
        raise SystemExit("qemu-img is needed for the demo (Debian: apt-get install qemu-utils)")
    started = time.monotonic()
    work = Path("demo-hyperv-run").resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    certs = lab.LabCerts.create(work / "certs")
    print(f"CA and certificates in {certs.directory}")
    password = secrets.token_urlsafe(18)
    with _standin(work, certs, password) as host:
        control = ControlClient(host["control"], host["token"])
        print(f"Hyper-V host stand-in at {host['url']} (Basic over HTTPS), its drives in {host['drives']}")
        _guest_writes(control, FILL)
        drives = Path(host["drives"])
        target = lab.AgentProcess("target_agent", lab.target_config(work, certs), work / "target.log")
        proxy = lab.AgentProcess("proxy_agent", _proxy_config(work, certs, drives), work / "proxy.log")
        controller = lab.AgentProcess("controller", lab.controller_config(work, certs), work / "controller.log")
        try:
            lab.start_all([target, proxy, controller])
            print(f"target {target.address}, proxy {proxy.address}, controller {controller.address} (mTLS, SQLite)")

            def run(*args: str, capture: bool = False) -> str:
                return _vmrepl(controller.address, certs.directory, *args, capture=capture)

            os.environ[SECRET_ENV] = password  # the CLI's child reads it; it is never on a command line
            run("infra", "credential-add", "hv01-winrm", "--username", host["username"], "--secret-env", SECRET_ENV)
            run("infra", "target-add", "target", "--address", target.address)
            run("infra", "proxy-add", "proxy1", "--address", proxy.address)
            run(
                "infra", "host-add", "hv01", "--provider", "hyperv", "--address", "localhost",
                "--credential", "hv01-winrm", "--winrm-auth", "basic", "--winrm-port", str(host["port"]),
                "--winrm-ca-bundle", str(certs.directory / "ca.pem"),
            )  # fmt: skip
            run("infra", "vms", "hv01")
            run("job", "create", "hv", "--host", "hv01", "--target", "target", "--vm", VM, "--keep", "3",
                "--retries", "0")  # fmt: skip
            run("job", "start", "hv", "--wait")
            _guest_writes(control, CHANGES)
            run("job", "start", "hv", "--wait")
            run("session", "show", _last_session(run))
            run("restore-points", "list", "hv")
            print()
            _compare(work, host)
            print(f"the replica is identical to {VM}'s disks ({time.monotonic() - started:.0f} s)")
        finally:
            for p in (controller, proxy, target):
                p.stop()


if __name__ == "__main__":
    main()
