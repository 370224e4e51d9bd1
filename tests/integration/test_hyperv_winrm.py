"""The Hyper-V WinRM client (vmrepl/providers/hyperv/winrm.py) against the WS-Management stand-in.

The stand-in runs no PowerShell: a handler registered for a shipped script's exact text reads the
parameters from the shell's environment, as the script does, and answers what a host would print. What is
proven here is the calling convention and the error mapping over the real pywinrm client: HTTPS with Basic
and the lab CA, and HTTP with NTLM message encryption.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from prometheus_client import REGISTRY
from pydantic import SecretStr

from controller import lab
from tests.support.certs import tls_settings
from tests.support.wsman import (
    CMD_LINE_LIMIT,
    ScriptCall,
    ScriptRegistry,
    ScriptResult,
    WsmanServer,
    clixml_error,
    https_standin,
)
from vmrepl.errors import DeadlineExceeded, HostAuthError, HostError, HostOutputError, HostTrustError, HostUnreachable
from vmrepl.providers.hyperv import models as m
from vmrepl.providers.hyperv import scripts
from vmrepl.providers.hyperv.winrm import PARAMS_VARIABLE, HostClient, WinRmSettings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

USER, PASSWORD = "standin\\replicator", "correct horse battery staple"
HOST_INFO = {
    "name": "HV01",
    "os_version": "10.0.17763.0",
    "os_build": 17763,
    "os_caption": "Microsoft Windows Server 2019 Datacenter",
    "hyperv_version": "10.0.17763.1",
    "supported_versions": ["5.0", "9.0"],
}
PROGRESS = (
    b'#< CLIXML\r\n<Objs Version="1.1.0.1" xmlns="http://schemas.microsoft.com/powershell/2004/04">'
    b'<Obj S="progress" RefId="0"><TN RefId="0"><T>System.Management.Automation.PSCustomObject</T>'
    b'<T>System.Object</T></TN><MS><I64 N="SourceId">1</I64><PR N="Record"><AV>Preparing modules for first use.'
    b"</AV><AI>0</AI><Nil /><PI>-1</PI><PC>-1</PC><T>Completed</T><SR>-1</SR><SD> </SD></PR></MS></Obj></Objs>"
)


def ok(operation: str, result: Any) -> bytes:
    return json.dumps({"ok": True, "host": "HV01", "operation": operation, "result": result}).encode("utf-8")


def params_of(call: ScriptCall) -> dict[str, Any]:
    """What common.ps1 does with $env:VMREPL_PARAMS: base64, then UTF-8, then JSON."""
    decoded = json.loads(base64.b64decode(call.env[PARAMS_VARIABLE], validate=True).decode("utf-8"))
    assert isinstance(decoded, dict)
    return decoded


@pytest.fixture
def registry() -> ScriptRegistry:
    return ScriptRegistry()


@pytest.fixture
def https_server(lab_certs: lab.LabCerts, registry: ScriptRegistry) -> Iterator[WsmanServer]:
    tls = tls_settings(lab_certs, "target")  # issued for localhost, signed by the lab CA
    with https_standin(tls.cert_file, tls.key_file, registry, username=USER, password=PASSWORD) as srv:
        yield srv
    assert srv.handler_errors == []


@pytest.fixture
def ntlm_server(registry: ScriptRegistry) -> Iterator[WsmanServer]:
    with WsmanServer(
        auth="ntlm", username=USER, password=PASSWORD, registry=registry, stream_chunk=100, streams_per_receive=2
    ) as srv:
        yield srv
    assert srv.handler_errors == []


def https_client(
    server: WsmanServer, lab_certs: lab.LabCerts | None, *, password: str = PASSWORD, **extra: Any
) -> HostClient:
    url = urlsplit(server.url)
    assert url.scheme == "https" and url.port is not None
    settings = WinRmSettings(
        address="localhost",
        port=url.port,
        scheme="https",
        auth="basic",
        ca_bundle=str(lab_certs.directory / "ca.pem") if lab_certs is not None else "",
        username=USER,
        password=SecretStr(password),
        operation_timeout_seconds=extra.pop("operation_timeout_seconds", 5),
        read_timeout_seconds=extra.pop("read_timeout_seconds", 10),
        **extra,
    )
    return HostClient(settings)


def ntlm_client(server: WsmanServer, *, password: str = PASSWORD) -> HostClient:
    url = urlsplit(server.url)
    assert url.scheme == "http" and url.port is not None
    settings = WinRmSettings(
        address="localhost",
        port=url.port,
        scheme="http",
        auth="ntlm",
        username=USER,
        password=SecretStr(password),
        operation_timeout_seconds=5,
        read_timeout_seconds=10,
    )
    return HostClient(settings)


def _runs(script: str, outcome: str) -> float:
    """How many runs of `script` ended with `outcome`, as Prometheus counts them."""
    value = REGISTRY.get_sample_value("vmrepl_host_script_seconds_count", {"script": script, "outcome": outcome})
    return value or 0.0


async def test_host_info_over_https_basic(
    https_server: WsmanServer, registry: ScriptRegistry, lab_certs: lab.LabCerts
) -> None:
    seen: list[dict[str, Any]] = []

    def host_info(call: ScriptCall) -> ScriptResult:
        seen.append(params_of(call))
        return ScriptResult(stdout=ok("host_info", HOST_INFO))

    registry.register(scripts.text("host_info"), host_info)
    before = _runs("host_info", "ok")

    info = await https_client(https_server, lab_certs).run("host_info", m.NoParams())

    assert info == m.HostInfo.model_validate(HOST_INFO)
    assert seen == [{}]
    assert _runs("host_info", "ok") == before + 1  # vmrepl_host_script_seconds
    assert https_server.shells == {}  # the shell was deleted after the call


def test_every_shipped_script_is_longer_than_a_command_line_allows() -> None:
    # Why the script goes over stdin: none of them would fit on cmd.exe's command line, even unencoded.
    assert all(len(scripts.text(name)) > CMD_LINE_LIMIT for name in scripts.SCRIPTS)


async def test_params_with_non_ascii_and_quotes_round_trip_over_ntlm(
    ntlm_server: WsmanServer, registry: ScriptRegistry
) -> None:
    name = "测试虚拟机1 \"quoted\" 'single' $(Remove-Item C:\\) `n"
    vm = {
        "id": "4f27bc34-0000-4000-8000-000000000001",
        "name": name,
        "state": "Off",
        "enabled_state": 3,
        "generation": 2,
        "version": "9.0",
        "secure_boot": True,
        "secure_boot_template": "MicrosoftWindows",
        "tpm": False,
        "processors": 2,
        "memory_startup": 2147483648,
        "dynamic_memory": False,
        "memory_minimum": 536870912,
        "memory_maximum": 1099511627776,
        "checkpoint_type": "Production",
        "notes": "",
        "nics": [],
        "disks": [],
        "unsupported_disks": [],
    }
    received: list[ScriptCall] = []

    def get_vm(call: ScriptCall) -> ScriptResult:
        received.append(call)
        wanted = params_of(call)["vm"]
        return ScriptResult(stdout=ok("Get-VM", [vm] if wanted == name else []))

    registry.register(scripts.text("get_vm"), get_vm)

    found = await ntlm_client(ntlm_server).run("get_vm", m.VmParams(vm=name))

    assert [v.name for v in found] == [name]
    assert received[0].script == scripts.text("get_vm") and name not in received[0].script
    assert ntlm_server.refused_unencrypted == 0
    assert await ntlm_client(ntlm_server).run("get_vm", m.VmParams(vm="other")) == []


async def test_error_envelope_is_host_error_with_code(
    https_server: WsmanServer, registry: ScriptRegistry, lab_certs: lab.LabCerts
) -> None:
    error = {
        "ok": False,
        "host": "HV01",
        "operation": "Msvm_VirtualSystemSnapshotService.CreateSnapshot",
        "message": "Msvm_VirtualSystemSnapshotService.CreateSnapshot returned 32775",
        "code": 32775,
    }
    registry.register(
        scripts.text("create_checkpoint"), lambda _: ScriptResult(stdout=json.dumps(error).encode(), exit_code=1)
    )
    params = m.CreateCheckpointParams(
        vm_id="4f27bc34-0000-4000-8000-000000000001",
        name="vmrepl-s1",
        consistency_level=1,  # application consistent
        guest_backup_type=2,  # copy
        timeout_seconds=60,
    )

    before = _runs("create_checkpoint", "HostError")
    with pytest.raises(HostError) as raised:
        await https_client(https_server, lab_certs).run("create_checkpoint", params)

    assert _runs("create_checkpoint", "HostError") == before + 1
    assert raised.value.code == 32775
    assert raised.value.operation == "Msvm_VirtualSystemSnapshotService.CreateSnapshot"
    assert raised.value.host == "HV01"


async def test_clixml_stderr_with_exit_0_and_an_ok_envelope_is_success(
    https_server: WsmanServer, registry: ScriptRegistry, lab_certs: lab.LabCerts
) -> None:
    registry.register(
        scripts.text("list_checkpoints"),
        lambda _: ScriptResult(stdout=ok("Msvm_SnapshotOfVirtualSystem", []), stderr=PROGRESS, exit_code=0),
    )

    result = await https_client(https_server, lab_certs).run("list_checkpoints", m.VmParams(vm="x"))

    assert result == []


async def test_exit_1_without_an_envelope_is_host_output_error_with_the_stderr_message(
    https_server: WsmanServer, registry: ScriptRegistry, lab_certs: lab.LabCerts
) -> None:
    message = "Get-VM : You do not have the required permission to complete this task."
    registry.register(scripts.text("list_vms"), lambda _: ScriptResult(stderr=clixml_error(message), exit_code=1))

    with pytest.raises(HostOutputError) as raised:
        await https_client(https_server, lab_certs).run("list_vms", m.NoParams())

    assert message in str(raised.value) and "exited with code 1" in str(raised.value)


async def test_ok_envelope_with_a_non_zero_exit_code_is_refused(
    https_server: WsmanServer, registry: ScriptRegistry, lab_certs: lab.LabCerts
) -> None:
    registry.register(scripts.text("host_info"), lambda _: ScriptResult(stdout=ok("host_info", HOST_INFO), exit_code=1))

    with pytest.raises(HostOutputError, match="exited with code 1"):
        await https_client(https_server, lab_certs).run("host_info", m.NoParams())


@pytest.mark.parametrize("mode", ["https", "ntlm"])
async def test_wrong_password_is_an_auth_error_without_the_password(
    mode: str, registry: ScriptRegistry, lab_certs: lab.LabCerts, request: pytest.FixtureRequest
) -> None:
    wrong = "wrong-Secret-9"
    server: WsmanServer = request.getfixturevalue(f"{mode}_server")
    client = https_client(server, lab_certs, password=wrong) if mode == "https" else ntlm_client(server, password=wrong)

    with pytest.raises(HostAuthError) as raised:
        await client.run("host_info", m.NoParams())

    text = str(raised.value) + repr(client.settings)
    assert USER in str(raised.value) and wrong not in text and PASSWORD not in text
    assert server.shells == {}


async def test_untrusted_certificate_is_a_trust_error_naming_ca_bundle(https_server: WsmanServer) -> None:
    with pytest.raises(HostTrustError) as raised:
        await https_client(https_server, None).run("host_info", m.NoParams())  # system trust: no lab CA

    assert "not trusted" in str(raised.value) and "--winrm-ca-bundle" in str(raised.value)
    assert https_server.shells == {}


async def test_connection_refused_is_host_unreachable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before the client connects: nothing listens there
    settings = WinRmSettings(
        address="127.0.0.1", port=port, username=USER, password=SecretStr(PASSWORD), read_timeout_seconds=5,
        operation_timeout_seconds=2,
    )  # fmt: skip

    with pytest.raises(HostUnreachable, match=f"127.0.0.1:{port}"):
        await HostClient(settings).run("host_info", m.NoParams())


async def test_script_past_its_timeout_is_abandoned_and_the_shell_closed(
    https_server: WsmanServer, registry: ScriptRegistry, lab_certs: lab.LabCerts
) -> None:
    release = threading.Event()

    def hangs(_: ScriptCall) -> ScriptResult:
        release.wait(20)
        return ScriptResult(stdout=ok("host_info", HOST_INFO))

    registry.register(scripts.text("host_info"), hangs)
    client = https_client(
        https_server, lab_certs, script_timeout_seconds=1, operation_timeout_seconds=1, read_timeout_seconds=5
    )
    try:
        with pytest.raises(DeadlineExceeded, match="within 1 s"):
            await client.run("host_info", m.NoParams())
        assert https_server.timeout_faults >= 1  # the host held Receive open and answered the timeout fault
        assert https_server.shells == {}
    finally:
        release.set()


async def test_wrong_params_type_is_refused_before_connecting() -> None:
    settings = WinRmSettings(address="127.0.0.1", port=9, username=USER, password=SecretStr(PASSWORD))
    with pytest.raises(Exception, match="takes VmParams"):
        await HostClient(settings).run("get_vm", m.NoParams())
    with pytest.raises(Exception, match="not a script"):
        await asyncio.wait_for(HostClient(settings).run("format_c", m.NoParams()), 5)


async def test_cancelled_call_terminates_the_command_and_closes_the_shell(
    https_server: WsmanServer, registry: ScriptRegistry, lab_certs: lab.LabCerts
) -> None:
    started, release = threading.Event(), threading.Event()

    def hangs(_: ScriptCall) -> ScriptResult:
        started.set()
        release.wait(20)
        return ScriptResult(stdout=ok("host_info", HOST_INFO))

    registry.register(scripts.text("host_info"), hangs)
    client = https_client(https_server, lab_certs, operation_timeout_seconds=1, read_timeout_seconds=5)
    call = asyncio.create_task(client.run("host_info", m.NoParams()))
    try:
        assert await asyncio.to_thread(started.wait, 10)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        # The worker notices at its next Receive (OperationTimeout 1 s), then signals and deletes the shell.
        for _ in range(100):
            if not https_server.shells:
                break
            await asyncio.sleep(0.1)
        assert https_server.shells == {}
        assert "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/Signal" in https_server.actions
    finally:
        release.set()
