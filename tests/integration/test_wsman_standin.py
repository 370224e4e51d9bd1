"""The WS-Management stand-in against the unmodified pywinrm client (`winrm.protocol.Protocol`) over HTTPS.

Stdin goes through pywinrm's public `Protocol.send_command_input`, as the Hyper-V client will send its scripts.
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Iterator

import pytest
import requests
from winrm.exceptions import InvalidCredentialsError, WinRMTransportError, WSManFaultError
from winrm.protocol import Protocol

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

pytestmark = [pytest.mark.integration, pytest.mark.timeout(20)]

USER, PASSWORD = "standin\\replicator", "correct horse battery staple"
PS_ARGS = ["-NoProfile", "-NonInteractive", "-Command", "-"]


@pytest.fixture
def registry() -> ScriptRegistry:
    return ScriptRegistry()


@pytest.fixture
def server(lab_certs: lab.LabCerts, registry: ScriptRegistry) -> Iterator[WsmanServer]:
    tls = tls_settings(lab_certs, "target")  # issued for localhost, signed by the lab CA
    with https_standin(tls.cert_file, tls.key_file, registry, username=USER, password=PASSWORD) as srv:
        yield srv
    assert srv.handler_errors == []


def client(server: WsmanServer, lab_certs: lab.LabCerts, *, password: str = PASSWORD, op_timeout: int = 5) -> Protocol:
    return Protocol(
        endpoint=server.url,
        transport="basic",
        username=USER,
        password=password,
        server_cert_validation="validate",
        ca_trust_path=str(lab_certs.directory / "ca.pem"),
        operation_timeout_sec=op_timeout,
        read_timeout_sec=op_timeout + 5,
    )


def run_script(p: Protocol, script: str) -> tuple[bytes, bytes, int]:
    """What the Hyper-V client does: powershell reading its script from stdin, then a clean shutdown."""
    shell_id = p.open_shell()
    command_id = p.run_command(shell_id, "powershell.exe", PS_ARGS)
    p.send_command_input(shell_id, command_id, script, end=True)
    out = p.get_command_output(shell_id, command_id)
    p.cleanup_command(shell_id, command_id)  # asserts RelatesTo == its MessageID
    p.close_shell(shell_id)  # likewise
    return out


def test_stdin_script_output_split_over_streams_and_receives(
    server: WsmanServer, registry: ScriptRegistry, lab_certs: lab.LabCerts
) -> None:
    script = "$ProgressPreference = 'SilentlyContinue'\r\n# " + "x" * 20_000  # far past 8,191: stdin has no limit
    stdout = bytes(range(256)) * 4  # 1,024 bytes: 11 Stream elements of 100 bytes, 2 per Receive
    seen: list[str] = []

    def handler(call: ScriptCall) -> ScriptResult:
        text = call.script
        seen.append(text)
        return ScriptResult(stdout=stdout, exit_code=0)

    registry.register(script, handler)

    out, err, rc = run_script(client(server, lab_certs), script)

    assert (out, err, rc) == (stdout, b"", 0)
    assert seen == [script]
    assert server.actions.count("http://schemas.microsoft.com/wbem/wsman/1/windows/shell/Receive") == 6
    assert server.shells == {}  # Delete removed the shell


def test_operation_timeout_fault_is_retried_by_pywinrm(
    server: WsmanServer, registry: ScriptRegistry, lab_certs: lab.LabCerts
) -> None:
    script = "Get-VM | ConvertTo-Json -Compress"
    released = threading.Event()

    def slow(_: ScriptCall) -> ScriptResult:
        # Output becomes ready only after the server has answered two Receives with the timeout fault.
        deadline = time.monotonic() + 15
        while server.timeout_faults < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        released.set()
        return ScriptResult(stdout=b'{"done":true}', exit_code=0 if server.timeout_faults >= 2 else 99)

    registry.register(script, slow)
    out, err, rc = run_script(client(server, lab_certs, op_timeout=1), script)

    assert released.is_set()
    assert (out, err, rc) == (b'{"done":true}', b"", 0)
    assert server.timeout_faults >= 2


def test_clixml_stderr_and_unknown_script(
    server: WsmanServer, registry: ScriptRegistry, lab_certs: lab.LabCerts
) -> None:
    registry.register("Write-Error 'boom'", lambda _: ScriptResult(stderr=clixml_error("boom <&>"), exit_code=1))
    p = client(server, lab_certs)

    out, err, rc = run_script(p, "Write-Error 'boom'")
    assert (out, rc) == (b"", 1)
    assert err.startswith(b'#< CLIXML\r\n<Objs Version="1.1.0.1"')
    assert b'<S S="Error">boom &lt;&amp;&gt;_x000D__x000A_</S>' in err

    out, err, rc = run_script(p, "Remove-Item C:\\ -Recurse")  # registered nowhere: refused, never run
    assert (out, rc) == (b"", 1)
    assert err.startswith(b"#< CLIXML\r\n") and b"no handler for this script" in err


def test_command_line_over_8191_characters_refused(
    server: WsmanServer, registry: ScriptRegistry, lab_certs: lab.LabCerts
) -> None:
    p = client(server, lab_certs)
    shell_id = p.open_shell()
    prefix = "powershell -encodedcommand "
    for length, expected in ((CMD_LINE_LIMIT, 9009), (CMD_LINE_LIMIT + 1, 1)):
        # run_ps's shape; at exactly 8,191 characters cmd.exe accepts the line (and knows no such program here).
        encoded = base64.b64encode(("x" * length).encode("utf-16-le")).decode()[: length - len(prefix)]
        command_id = p.run_command(shell_id, prefix + encoded)
        out, err, rc = p.get_command_output(shell_id, command_id)
        p.cleanup_command(shell_id, command_id)
        assert (out, rc) == (b"", expected), (length, err)
    assert err == b"The command line is too long.\r\n"
    p.close_shell(shell_id)


def test_wrong_password_refused(server: WsmanServer, lab_certs: lab.LabCerts) -> None:
    with pytest.raises(InvalidCredentialsError):
        client(server, lab_certs, password="wrong").open_shell()
    assert server.shells == {} and server.actions == []


def test_unknown_shell_id_fault(server: WsmanServer, lab_certs: lab.LabCerts) -> None:
    p = client(server, lab_certs)
    with pytest.raises(WSManFaultError) as raised:
        p.run_command("0C4A4E8E-5A8B-4C43-9C4D-6B5E0D1D2F00", "powershell.exe", PS_ARGS)
    assert raised.value.wsman_fault_code == 2150858843
    assert raised.value.fault_subcode == "w:InvalidSelectors"
    assert raised.value.code == 500


# --- NTLM with message encryption over plain HTTP ------------------------------------------------------------


@pytest.fixture
def ntlm_server(registry: ScriptRegistry) -> Iterator[WsmanServer]:
    with WsmanServer(
        auth="ntlm", username=USER, password=PASSWORD, registry=registry, stream_chunk=100, streams_per_receive=2
    ) as srv:
        yield srv
    assert srv.handler_errors == []


def ntlm_client(server: WsmanServer, *, password: str = PASSWORD) -> Protocol:
    assert server.url.startswith("http://")
    return Protocol(
        endpoint=server.url,
        transport="ntlm",
        username=USER,
        password=password,
        message_encryption="always",
        operation_timeout_sec=5,
        read_timeout_sec=10,
    )


class _Wire:
    """Every request and response body pywinrm's session sent and received, as bytes on the wire."""

    def __init__(self, p: Protocol) -> None:
        self.requests: list[tuple[str, bytes]] = []
        self.responses: list[tuple[str, bytes]] = []
        session = p.transport.build_session()
        session.hooks["response"].insert(0, self._record)

    def _record(self, response: requests.Response, *args: object, **kwargs: object) -> None:
        body = response.request.body
        sent = body if isinstance(body, bytes) else str(body or "").encode()  # pywinrm always sends bytes
        self.requests.append((str(response.request.headers.get("Content-Type", "")), sent))
        self.responses.append((response.headers.get("Content-Type", ""), response.content))


def test_ntlm_encrypted_stdin_script_split_output(ntlm_server: WsmanServer, registry: ScriptRegistry) -> None:
    script = "$ProgressPreference = 'SilentlyContinue'\r\n# ntlm " + "y" * 9_000
    stdout = bytes(range(256)) * 4  # 11 Stream elements of 100 bytes, 2 per Receive, each reply sealed
    stderr = clixml_error("warning: stand-in")
    registry.register(script, lambda _: ScriptResult(stdout=stdout, stderr=stderr, exit_code=3))
    p = ntlm_client(ntlm_server)
    wire = _Wire(p)

    out, err, rc = run_script(p, script)

    assert (out, err, rc) == (stdout, stderr, 3)
    assert ntlm_server.actions.count("http://schemas.microsoft.com/wbem/wsman/1/windows/shell/Receive") == 7
    assert ntlm_server.shells == {} and ntlm_server.refused_unencrypted == 0
    soap_requests = [(ct, body) for ct, body in wire.requests if body]
    assert len(soap_requests) == len(ntlm_server.actions) and soap_requests
    for content_type, body in soap_requests + [r for r in wire.responses if r[1]]:
        assert 'protocol="application/HTTP-SPNEGO-session-encrypted"' in content_type
        assert body.startswith(b"--Encrypted Boundary\r\n") and body.endswith(b"--Encrypted Boundary--\r\n")
        assert b"Envelope" not in body and b"ntlm yyyy" not in body and b"CLIXML" not in body  # sealed, not signed


def test_ntlm_wrong_password_refused(ntlm_server: WsmanServer) -> None:
    with pytest.raises(InvalidCredentialsError):
        ntlm_client(ntlm_server, password="wrong").open_shell()
    assert ntlm_server.shells == {} and ntlm_server.actions == []


def test_ntlm_unencrypted_request_after_auth_refused(ntlm_server: WsmanServer) -> None:
    p = ntlm_client(ntlm_server)
    shell_id = p.open_shell()  # authenticated, encrypted: works
    assert list(ntlm_server.shells) == [shell_id]

    p.transport.encryption = None  # same authenticated session, SOAP now sent in clear
    with pytest.raises(WinRMTransportError) as raised:
        p.run_command(shell_id, "powershell.exe", PS_ARGS)
    assert raised.value.code == 500
    assert ntlm_server.refused_unencrypted == 1
    assert ntlm_server.actions == ["http://schemas.xmlsoap.org/ws/2004/09/transfer/Create"]  # never handled
