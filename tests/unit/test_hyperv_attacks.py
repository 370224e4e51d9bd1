"""Attacks on the Hyper-V capability that need no socket: a flood of calls against one host, a lying host's
answers to the provider, secrets in the text of errors.

Each test is a finding (or a guard on a defence that held) from attacking the Hyper-V stack as an attacker
and as an unlucky operator would.
"""

from __future__ import annotations

import asyncio
import io
import ssl
import threading
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from rich.console import Console
from typer.testing import CliRunner

from controller.api.resources.hosts import check_ca_bundle
from controller.cli import common, sessions
from controller.cli.main import app
from vmrepl.domain import MAX_WINRM_CALLS_PER_HOST, DiskFormat
from vmrepl.errors import HostOutputError, InvalidArgument
from vmrepl.extent import Extent
from vmrepl.providers.base import DiskInCheckpoint, Untracked
from vmrepl.providers.hyperv import models as m
from vmrepl.providers.hyperv import winrm
from vmrepl.providers.hyperv.changes import ChangeLimits, read_changes
from vmrepl.providers.hyperv.envelope import read_envelope
from vmrepl.providers.hyperv.winrm import HostClient, WinRmSettings, _Output
from vmrepl.security.certs import create_ca
from vmrepl.v1 import controller_pb2 as api

MiB = 1024**2
GiB = 1024**3
SECRET = "Hv-attack-5b1e 'pw' \"x\""


def client(address: str = "hv01.example.com") -> HostClient:
    return HostClient(WinRmSettings(address=address, username="LAB\\replicator", password=SecretStr(SECRET)))


class _Blocking:
    """Stands for the worker thread's WinRM exchange: holds each call until released, counting how many
    run at once per host."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.active: dict[str, int] = {}
        self.peak: dict[str, int] = {}

    def patch(self, c: HostClient) -> None:
        def call(name: str, stdin: bytes, env: dict[str, str], stop: threading.Event) -> Any:
            host = c.settings.address.casefold()
            with self.lock:
                self.active[host] = self.active.get(host, 0) + 1
                self.peak[host] = max(self.peak.get(host, 0), self.active[host])
            try:
                self.release.wait(30)
                raise HostOutputError("released")
            finally:
                with self.lock:
                    self.active[host] -= 1

        c._call = call  # type: ignore[method-assign]

    async def until_active(self, host: str, n: int) -> None:
        for _ in range(1000):  # up to 10 s on a loaded machine
            if self.active.get(host, 0) >= n:
                return
            await asyncio.sleep(0.01)


async def test_a_flood_of_calls_to_one_host_is_bounded_and_leaves_the_controllers_threads_free() -> None:
    # Finding: every script call ran in asyncio's default thread pool (min(32, cores + 4) threads) with no bound
    # per host. A reader calling ListHostVms in a loop against a slow host held every thread of that pool for up
    # to script_timeout_seconds each, so every other `asyncio.to_thread` of the controller (session logs, file
    # hosts) waited behind them, and as many WinRM shells as threads were open on the one host.
    blocking = _Blocking()
    clients = [client("hv01.example.com"), client("HV01.example.com"), client("hv02.example.com")]
    for c in clients:
        blocking.patch(c)
    flood = [
        asyncio.ensure_future(c.run("host_info", m.NoParams()))
        for c in clients
        for _ in range(MAX_WINRM_CALLS_PER_HOST * 3)
    ]
    try:
        await blocking.until_active("hv01.example.com", MAX_WINRM_CALLS_PER_HOST)
        await blocking.until_active("hv02.example.com", MAX_WINRM_CALLS_PER_HOST)
        # The rest of the controller still gets a thread while the hosts hold theirs.
        assert await asyncio.wait_for(asyncio.to_thread(lambda: "free"), 10) == "free"
        await asyncio.sleep(0.2)
        # One bound per host, whichever client (or letter case of the address) the calls came through.
        assert blocking.peak == {
            "hv01.example.com": MAX_WINRM_CALLS_PER_HOST,
            "hv02.example.com": MAX_WINRM_CALLS_PER_HOST,
        }
    finally:
        blocking.release.set()
        results = await asyncio.gather(*flood, return_exceptions=True)
    assert all(isinstance(r, HostOutputError) for r in results)


async def test_a_cancelled_call_keeps_its_slot_until_its_thread_has_ended() -> None:
    # A cancelled caller's thread goes on until its next Receive: its slot is free only then, or a caller that
    # cancels and retries in a loop would open shells past the bound.
    blocking = _Blocking()
    c = client("hv03.example.com")
    blocking.patch(c)
    first = [asyncio.ensure_future(c.run("host_info", m.NoParams())) for _ in range(MAX_WINRM_CALLS_PER_HOST)]
    await blocking.until_active("hv03.example.com", MAX_WINRM_CALLS_PER_HOST)
    for t in first:
        t.cancel()
    await asyncio.gather(*first, return_exceptions=True)
    more = [asyncio.ensure_future(c.run("host_info", m.NoParams())) for _ in range(MAX_WINRM_CALLS_PER_HOST)]
    await asyncio.sleep(0.2)
    assert blocking.peak["hv03.example.com"] == MAX_WINRM_CALLS_PER_HOST
    blocking.release.set()
    assert all(isinstance(r, HostOutputError) for r in await asyncio.gather(*more, return_exceptions=True))


# ---- what a host says, as the CLI prints it ------------------------------------------------------------

# Legal Hyper-V VM names (anyone who may create VMs on the host chooses them) and host messages.
HOSTILE_NAMES = ["web [prod]", "db[/]", "evil\x1b]0;pwned\x07\x1b[2Jname", "fake\rsucceeded"]


class _HostileApi:
    def ListHostVms(self, request: api.ListHostVmsRequest, timeout: float) -> api.ListHostVmsResponse:
        vms = [
            api.HostVm(
                id=f"id-{i}",
                name=name,
                state="Running",
                disks=[api.HostVmDisk(id="scsi0-0", path=f"D:\\VMs\\{name}\\d.vhdx", size_bytes=1 << 20)],
                details={"notes": name},
            )
            for i, name in enumerate(HOSTILE_NAMES)
        ]
        return api.ListHostVmsResponse(vms=vms)

    def GetSession(self, request: api.GetSessionRequest, timeout: float) -> api.Session:
        disk = api.DiskTask(disk_id="scsi0-0", state=api.DISK_TASK_STATE_FAILED, error="host said [/] \x1b[31m")
        vm = api.SessionVm(
            vm_name=HOSTILE_NAMES[1],
            disks=[disk],
            error="Get-VM : [/bold] denied",
            consistency_fallback="VSS [red]writer[/red] failed \x1b[2J",
        )
        return api.Session(name=request.name, job="jobs/j", state=api.SESSION_STATE_FAILED, vms=[vm], error="[/]")


@pytest.fixture
def hostile_terminal(monkeypatch: pytest.MonkeyPatch) -> Console:
    console = Console(width=200, record=True, file=io.StringIO())
    for module in (common, sessions):
        monkeypatch.setattr(module, "out", console)
    monkeypatch.setattr(common.conn, "_stub", _HostileApi())
    return console


@pytest.mark.parametrize("command", [["infra", "vms", "hv01"], ["session", "show", "sessions/abc"]])
def test_names_and_messages_from_a_host_are_printed_as_text(hostile_terminal: Console, command: list[str]) -> None:
    # Finding: the CLI's tables and lines took a host's VM names and messages as Rich markup. A VM named
    # `db[/]` made `vmrepl infra vms` fail with a MarkupError traceback, `web [prod]` was shown as `web `
    # (a name the operator then cannot copy), and escape sequences in a name reached the terminal (retitle,
    # clear the screen, overwrite a line with a carriage return).
    result = CliRunner().invoke(app, command)
    assert result.exit_code in (0, 1), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    text = hostile_terminal.export_text()
    assert "\x1b" not in text and "\r" not in text and "\x07" not in text, repr(text)
    flat = " ".join(text.replace("│", " ").split())
    if command[0] == "infra":
        assert "web [prod]" in flat and "db[/]" in flat and "evil\\x1b]0;pwned" in flat, flat
    else:
        assert (
            "db[/]" in flat
            and "host said [/]" in flat
            and "error: [/]" in flat
            and "VSS [red]writer[/red] failed" in flat
        ), flat


# ---- a host's WinRM CA bundle, as the API takes it ---------------------------------------------------------


def test_a_ca_bundle_that_holds_no_ca_certificate_is_refused_when_the_host_is_saved(tmp_path: Path) -> None:
    # Finding: the API took any file the controller could stat as winrm.ca_bundle (a private key, a DER
    # certificate, /etc/shadow); the mistake showed only at the first session, as "TLS with the WinRM service
    # failed". Now refused when the host is created or updated, without quoting the file.
    create_ca(tmp_path / "ca")
    check_ca_bundle("host.winrm.ca_bundle", str(tmp_path / "ca" / "ca.pem"))
    secret_line = "root:$6$Hv-attack-5b1e:19000:0:99999:7:::\n"
    wrong = {
        "shadow": secret_line.encode(),
        "key.pem": (tmp_path / "ca" / "ca.key").read_bytes(),
        "cert.der": ssl.PEM_cert_to_DER_cert((tmp_path / "ca" / "ca.pem").read_text()),
        "empty.pem": b"",
    }
    for name, content in wrong.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(InvalidArgument) as raised:
            check_ca_bundle("host.winrm.ca_bundle", str(path))
        assert raised.value.field == "host.winrm.ca_bundle" and "PEM" in str(raised.value), raised.value
        assert "Hv-attack" not in str(raised.value) and "PRIVATE" not in str(raised.value)
    with pytest.raises(InvalidArgument, match="not a file"):
        check_ca_bundle("host.winrm.ca_bundle", str(tmp_path))


# ---- a host's change lists -------------------------------------------------------------------------------


class _RepeatingHost:
    """A lying host: every disk_changes call says it processed one byte and lists the same ranges again."""

    def __init__(self, ranges: int) -> None:
        self.calls = 0
        self.answer = m.DiskChanges(
            processed=1,
            ranges=[m.ChangedRange(offset=i * 2 * MiB, length=4096) for i in range(ranges)],
            stalled=False,
        )

    async def run(self, name: str, params: Any) -> Any:
        assert name == "disk_changes"
        self.calls += 1
        return self.answer


async def test_a_host_repeating_the_same_ranges_is_not_asked_again_and_again() -> None:
    # Finding: only the merged list counted against max_total_ranges, so a host answering every call with the
    # same ranges and one byte processed kept the list short and was asked again up to max_calls (100,000)
    # times, each answer merged (sorted) with everything so far on the controller's event loop: with 20,000
    # ranges an answer, 0.7 s of a blocked loop per call, for hours. Every range a host sends counts now.
    host = _RepeatingHost(ranges=100)
    disk = DiskInCheckpoint(disk_id="scsi0-0", locator="D:\\VMs\\a.avhdx", format=DiskFormat.VHDX, size=1 << 40)
    limits = ChangeLimits(chunk=GiB, window=GiB, max_ranges=100, max_total_ranges=1000, max_calls=5000)
    got = await read_changes(host, disk=disk, limit_id="rctX:1", limits=limits, timeout_seconds=60)
    assert isinstance(got, Untracked) and "more than 1000 changed ranges" in got.reason, got
    assert host.calls == 11


async def test_an_honest_hosts_ranges_are_merged_once_across_windows() -> None:
    # The other side of the limit: ranges split at window boundaries are one range in the answer.
    class Honest:
        calls = 0

        async def run(self, name: str, params: Any) -> Any:
            self.calls += 1
            p: m.DiskChangesParams = params
            return m.DiskChanges(
                processed=p.length, ranges=[m.ChangedRange(offset=p.offset, length=p.length)], stalled=False
            )

    disk = DiskInCheckpoint(disk_id="scsi0-0", locator="D:\\VMs\\a.avhdx", format=DiskFormat.VHDX, size=8 * MiB)
    limits = ChangeLimits(chunk=MiB, window=MiB, max_ranges=10, max_total_ranges=8, max_calls=100)
    got = await read_changes(Honest(), disk=disk, limit_id="rctX:1", limits=limits, timeout_seconds=60)
    assert got == [Extent(0, 8 * MiB)]


async def test_a_hosts_output_is_parsed_in_the_worker_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    # Finding: up to MAX_STDOUT (64 MiB) of a host's JSON was parsed and validated (pydantic, millions of
    # items) on the controller's event loop once the worker thread returned it: seconds with every session
    # and API call of the controller stopped, at a lying host's choosing. Parsed in the worker thread now.
    c = client("hv04.example.com")
    envelope = (
        '{"ok":true,"host":"hv04","operation":"GetVirtualDiskChanges","result":'
        '{"processed":4096,"ranges":[{"offset":0,"length":4096}],"stalled":false}}'
    )
    monkeypatch.setattr(c, "_shell_call", lambda *a: _Output(envelope.encode(), b"", 0))
    threads: list[threading.Thread] = []

    def recording(stdout: bytes, kind: Any) -> Any:
        threads.append(threading.current_thread())
        return read_envelope(stdout, kind)

    monkeypatch.setattr(winrm, "read_envelope", recording)
    params = m.DiskChangesParams(
        path="D:\\a.avhdx", limit_id="rctX:1", offset=0, length=4096, chunk=4096, max_ranges=10, timeout_seconds=60
    )
    got = await c.run("disk_changes", params)
    assert isinstance(got, m.DiskChanges) and got.processed == 4096
    assert threads and threads[0] is not threading.main_thread()
