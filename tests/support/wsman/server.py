"""The stand-in's endpoint at /wsman, shells and commands as Windows keeps them.

Two modes, one per server: Basic auth over HTTPS, or NTLM over plain HTTP with every message encrypted
(tests/support/wsman/ntlm.py), as on a host with AllowUnencrypted=false (docs/hyperv.md).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ssl
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from contextlib import ExitStack
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Literal

from tests.support.wsman import ntlm, soap
from tests.support.wsman.runner import CommandRunner, ScriptRegistry, ScriptResult, clixml_error

MAX_BODY = 512 * 1024  # well above pywinrm's MaxEnvelopeSize of 153600


@dataclass
class Command:
    command_id: str
    stdin: bytearray = field(default_factory=bytearray)
    result: ScriptResult | None = None
    pending: list[tuple[str, bytes]] | None = None  # output not yet received, once the result is known
    started: bool = False


@dataclass
class Shell:
    shell_id: str
    codepage: str
    commands: dict[str, Command] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)


def _shell_not_found(shell_id: str) -> soap.BadRequest:
    return soap.BadRequest(
        code=soap.CODE_SHELL_NOT_FOUND,
        subcode="w:InvalidSelectors",
        reason=(
            f"The request for the Windows Remote Shell with ShellId {shell_id} failed because the shell was not "
            "found on the server. Possible causes are: the specified ShellId is incorrect or the shell no longer "
            "exists on the server. Provide the correct ShellId or create a new shell and retry the operation."
        ),
    )


def _codepage(value: str) -> str:
    # WINRS_CODEPAGE: 65001 is UTF-8; anything else is taken as a Windows "cpNNN" code page (437 by default).
    return "utf-8" if value == "65001" else f"cp{value or '437'}"


def _environment(req: soap.Request) -> dict[str, str]:
    """The shell's variables: `rsp:Shell/rsp:Environment/rsp:Variable Name=...` of the Create message."""
    out: dict[str, str] = {}
    for var in req.body.findall(f"{{{soap.RSP}}}Shell/{{{soap.RSP}}}Environment/{{{soap.RSP}}}Variable"):
        name = var.get("Name")
        if not name:
            raise soap.BadRequest(code=soap.CODE_SCHEMA, subcode="w:SchemaValidationError", reason="unnamed variable")
        out[name] = var.text or ""
    return out


class WsmanServer:
    """A WS-Man endpoint on 127.0.0.1; use as a context manager.

    auth="basic": HTTPS with the given certificate and Basic auth. auth="ntlm": plain HTTP, NTLM with message
    encryption; unencrypted messages are refused. The NTLM mode sets NTLM_USER_FILE while it runs.
    """

    def __init__(
        self,
        *,
        auth: Literal["basic", "ntlm"] = "basic",
        certfile: Path | None = None,
        keyfile: Path | None = None,
        username: str,
        password: str,
        registry: ScriptRegistry,
        stream_chunk: int = 4096,
        streams_per_receive: int = 8,
    ) -> None:
        self.registry = registry
        self.runner = CommandRunner(registry)
        self.auth = auth
        self._username, self._password = username, password
        self._credentials = f"{username}:{password}".encode()
        self._tls: ssl.SSLContext | None = None
        if auth == "basic":
            if certfile is None or keyfile is None:
                raise ValueError("Basic auth is served only over HTTPS: certfile and keyfile are required")
            self._tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._tls.load_cert_chain(certfile, keyfile)
        elif certfile is not None:
            raise ValueError("the NTLM mode is plain HTTP with message encryption: no certificate")
        self.refused_unencrypted = 0  # authenticated NTLM requests refused for not being encrypted
        self._stack = ExitStack()
        self.stream_chunk = stream_chunk
        self.streams_per_receive = streams_per_receive
        self.shells: dict[str, Shell] = {}
        self.timeout_faults = 0
        self.handler_errors: list[Exception] = []  # exceptions raised by registered handlers
        self.actions: list[str] = []  # every authenticated request's action, in order
        self._cond = threading.Condition()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        scheme = "https" if self._tls is not None else "http"
        return f"{scheme}://localhost:{self._httpd.server_address[1]}/wsman"

    def __enter__(self) -> WsmanServer:
        if self.auth == "ntlm":
            self._stack.enter_context(ntlm.user_file(self._username, self._password))
        handler = type("Handler", (_Handler,), {"standin": self})
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        httpd.daemon_threads = True
        if self._tls is not None:
            # The handshake happens on the handler's thread, so a stalled client cannot block accept().
            httpd.socket = self._tls.wrap_socket(httpd.socket, server_side=True, do_handshake_on_connect=False)
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, name="wsman-standin", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._stack.close()

    def authorized(self, header: str | None) -> bool:
        if header is None or not header.startswith("Basic "):
            return False
        try:
            given = base64.b64decode(header[6:], validate=True)
        except binascii.Error:
            return False
        return hmac.compare_digest(given, self._credentials)

    # --- operations -------------------------------------------------------------------------------------
    def handle(self, req: soap.Request) -> bytes:
        with self._cond:
            self.actions.append(req.action)
        if req.resource_uri != soap.SHELL_URI:
            raise soap.BadRequest(
                code=soap.CODE_ACTION_NOT_SUPPORTED,
                subcode="w:DestinationUnreachable",
                reason=f"The stand-in serves only {soap.SHELL_URI}, not {req.resource_uri!r}.",
            )
        if req.action == soap.CREATE:
            return self._create(req)
        if req.action == soap.RECEIVE:
            return self._receive(req)
        operations = {soap.COMMAND: self._command, soap.SEND: self._send, soap.SIGNAL: self._signal}
        with self._cond:
            shell = self._shell(req)
            if req.action == soap.DELETE:
                del self.shells[shell.shell_id]
                return soap.envelope(action=soap.DELETE + "Response", relates_to=req.message_id, body="")
            operation = operations.get(req.action)
            if operation is None:
                raise soap.BadRequest(
                    code=soap.CODE_ACTION_NOT_SUPPORTED,
                    subcode="a:ActionNotSupported",
                    reason=f"The action {req.action!r} is not supported by the service.",
                )
            return operation(req, shell)

    def _shell(self, req: soap.Request) -> Shell:
        shell = self.shells.get(req.shell_id or "")
        if shell is None:
            raise _shell_not_found(req.shell_id or "")
        return shell

    def _command_of(self, shell: Shell, element: ET.Element | None) -> Command:
        command_id = element.get("CommandId", "") if element is not None else ""
        command = shell.commands.get(command_id.upper())
        if command is None:
            raise soap.BadRequest(
                code=soap.CODE_SCHEMA,
                subcode="w:InvalidParameter",
                reason=f"The CommandId {command_id!r} names no command of shell {shell.shell_id}.",
            )
        return command

    def _create(self, req: soap.Request) -> bytes:
        shell_id = str(uuid.uuid4()).upper()
        with self._cond:
            self.shells[shell_id] = Shell(
                shell_id, _codepage(req.options.get("WINRS_CODEPAGE", "")), env=_environment(req)
            )
        body = (
            f"<x:ResourceCreated><a:Address>{soap.ANONYMOUS}</a:Address><a:ReferenceParameters>"
            f"<w:ResourceURI>{soap.SHELL_URI}</w:ResourceURI><w:SelectorSet>"
            f'<w:Selector Name="ShellId">{shell_id}</w:Selector></w:SelectorSet></a:ReferenceParameters>'
            f'</x:ResourceCreated><rsp:Shell xmlns:rsp="{soap.RSP}"><rsp:ShellId>{shell_id}</rsp:ShellId>'
            f"<rsp:ResourceUri>{soap.SHELL_URI}</rsp:ResourceUri><rsp:Owner>standin\\user</rsp:Owner>"
            "<rsp:ClientIP>127.0.0.1</rsp:ClientIP><rsp:IdleTimeOut>PT7200.000S</rsp:IdleTimeOut>"
            "<rsp:InputStreams>stdin</rsp:InputStreams><rsp:OutputStreams>stdout stderr</rsp:OutputStreams>"
            "<rsp:ShellRunTime>P0DT0H0M0S</rsp:ShellRunTime><rsp:ShellInactivity>P0DT0H0M0S</rsp:ShellInactivity>"
            "</rsp:Shell>"
        )
        return soap.envelope(action=soap.CREATE + "Response", relates_to=req.message_id, body=body)

    def _command(self, req: soap.Request, shell: Shell) -> bytes:
        line_node = req.body.find(f"{{{soap.RSP}}}CommandLine")
        if line_node is None:
            raise soap.BadRequest(code=soap.CODE_SCHEMA, subcode="w:SchemaValidationError", reason="no CommandLine")
        parts = [(line_node.findtext(f"{{{soap.RSP}}}Command") or "").strip()]
        parts += [a.text or "" for a in line_node.findall(f"{{{soap.RSP}}}Arguments")]
        skip_cmd = req.options.get("WINRS_SKIP_CMD_SHELL", "FALSE").upper() == "TRUE"
        command = Command(str(uuid.uuid4()).upper())
        command.result = self.runner.check_command_line(" ".join(p for p in parts if p), skip_cmd_shell=skip_cmd)
        command.started = command.result is not None
        shell.commands[command.command_id] = command
        self._cond.notify_all()
        body = f"<rsp:CommandResponse><rsp:CommandId>{command.command_id}</rsp:CommandId></rsp:CommandResponse>"
        return soap.envelope(action=soap.COMMAND + "Response", relates_to=req.message_id, body=body)

    def _send(self, req: soap.Request, shell: Shell) -> bytes:
        stream = req.body.find(f"{{{soap.RSP}}}Send/{{{soap.RSP}}}Stream")
        if stream is None:
            raise soap.BadRequest(code=soap.CODE_SCHEMA, subcode="w:SchemaValidationError", reason="no Send/Stream")
        command = self._command_of(shell, stream)
        try:
            command.stdin += base64.b64decode((stream.text or "").strip(), validate=True)
        except binascii.Error:
            raise soap.BadRequest(
                code=soap.CODE_SCHEMA, subcode="w:SchemaValidationError", reason="bad base64"
            ) from None
        if stream.get("End", "false").lower() == "true" and not command.started:
            command.started = True
            script = bytes(command.stdin).decode(shell.codepage, "replace")
            threading.Thread(target=self._run, args=(command, script, shell.env), daemon=True).start()
        return soap.envelope(action=soap.SEND + "Response", relates_to=req.message_id, body="<rsp:SendResponse/>")

    def _run(self, command: Command, script: str, env: dict[str, str]) -> None:
        try:
            result = self.runner.run_script(script, env)
        except Exception as e:  # a test's handler failed: end the command visibly instead of hanging Receive
            self.handler_errors.append(e)
            result = ScriptResult(stderr=clixml_error(f"stand-in handler failed: {e!r}"), exit_code=1)
        with self._cond:
            command.result = result
            self._cond.notify_all()

    def _signal(self, req: soap.Request, shell: Shell) -> bytes:
        signal = req.body.find(f"{{{soap.RSP}}}Signal")
        command = self._command_of(shell, signal)
        code = signal.findtext(f"{{{soap.RSP}}}Code") if signal is not None else None
        if code != soap.SIGNAL_TERMINATE:
            raise soap.BadRequest(code=soap.CODE_SCHEMA, subcode="w:InvalidParameter", reason=f"signal {code!r}")
        del shell.commands[command.command_id]
        body = "<rsp:SignalResponse/>"
        return soap.envelope(action=soap.SIGNAL + "Response", relates_to=req.message_id, body=body)

    def _receive(self, req: soap.Request) -> bytes:
        deadline = time.monotonic() + req.operation_timeout
        with self._cond:
            shell = self._shell(req)
            command = self._command_of(shell, req.body.find(f"{{{soap.RSP}}}Receive/{{{soap.RSP}}}DesiredStream"))
            while command.result is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.timeout_faults += 1
                    self._cond.notify_all()
                    raise soap.BadRequest(
                        code=soap.CODE_TIMED_OUT,
                        subcode="w:TimedOut",
                        sender=False,
                        reason="The WS-Management service cannot complete the operation within the time "
                        "specified in OperationTimeout.",
                    )
                self._cond.wait(left)
            return self._output(req, command, command.result)

    def _output(self, req: soap.Request, command: Command, result: ScriptResult) -> bytes:
        if command.pending is None:
            size = self.stream_chunk
            command.pending = [("stdout", result.stdout[i : i + size]) for i in range(0, len(result.stdout), size)]
            command.pending += [("stderr", result.stderr[i : i + size]) for i in range(0, len(result.stderr), size)]
        batch = command.pending[: self.streams_per_receive]
        del command.pending[: self.streams_per_receive]
        cid = command.command_id
        parts = [soap.stream(name, cid, data) for name, data in batch]
        if command.pending:
            parts.append(f'<rsp:CommandState CommandId="{cid}" State="{soap.STATE_RUNNING}"/>')
        else:
            parts += [soap.stream("stdout", cid, b"", end=True), soap.stream("stderr", cid, b"", end=True)]
            parts.append(
                f'<rsp:CommandState CommandId="{cid}" State="{soap.STATE_DONE}">'
                f"<rsp:ExitCode>{result.exit_code}</rsp:ExitCode></rsp:CommandState>"
            )
        body = f"<rsp:ReceiveResponse>{''.join(parts)}</rsp:ReceiveResponse>"
        return soap.envelope(action=soap.RECEIVE + "Response", relates_to=req.message_id, body=body)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    standin: WsmanServer
    _ntlm: ntlm.Acceptor | None = None  # per TCP connection: one handler instance serves one connection

    def log_message(self, format: str, *args: object) -> None:
        pass  # tests read the server's state, not its access log

    def _reply(
        self, status: int, body: bytes, extra: dict[str, str] | None = None, *, content_type: str | None = None
    ) -> None:
        self.send_response(status)
        if body:
            self.send_header("Content-Type", content_type or "application/soap+xml;charset=UTF-8")
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        raw_length = self.headers.get("Content-Length") or "0"
        length = int(raw_length) if raw_length.isdigit() else -1
        if self.path.split("?")[0].lower() != "/wsman" or not 0 <= length <= MAX_BODY:
            self.close_connection = True
            self._reply(404 if 0 <= length <= MAX_BODY else 413, b"")
            return
        data = self.rfile.read(length)
        if self.standin.auth == "ntlm":
            self._ntlm_post(data)
            return
        if not self.standin.authorized(self.headers.get("Authorization")):
            # What Windows offers when Basic is enabled; the body is empty as on Windows.
            self._reply(401, b"", {"WWW-Authenticate": 'Basic realm="WSMAN"'})
            return
        self._reply(*self._soap(data))

    def _soap(self, data: bytes) -> tuple[int, bytes]:
        message_id = ""
        try:
            req = soap.parse_request(data)
            message_id = req.message_id
            return 200, self.standin.handle(req)
        except soap.BadRequest as e:
            return 500, soap.fault(relates_to=message_id, error=e)

    def _ntlm_post(self, data: bytes) -> None:
        acceptor = self._ntlm
        header = self.headers.get("Authorization")
        if acceptor is None or not acceptor.complete or header is not None:
            # requests-ntlm authenticates once per connection, then sends no Authorization header.
            acceptor = self._ntlm = acceptor or ntlm.Acceptor()
            done, challenge = acceptor.step(header)
            if not done:
                self._reply(401, b"", {"WWW-Authenticate": challenge})
                return
        if not data:
            self._reply(200, b"")  # pywinrm's empty POST that completes the handshake (setup_encryption)
            return
        try:
            plain = acceptor.unwrap(self.headers.get("Content-Type") or "", data)
        except ntlm.EncryptionError:
            # AllowUnencrypted=false: Windows answers HTTP 500 (pywinrm#129, #208); the empty body is our choice.
            with self.standin._cond:
                self.standin.refused_unencrypted += 1
            self.close_connection = True
            self._reply(500, b"")
            return
        status, body = self._soap(plain)
        self._reply(status, acceptor.wrap(body), content_type=ntlm.CONTENT_TYPE)


def https_standin(
    certfile: Path, keyfile: Path, registry: ScriptRegistry, *, username: str, password: str
) -> WsmanServer:
    """A Basic-over-HTTPS stand-in that splits output finely (100-byte Streams, two per Receive), so clients
    meet output spread over many Streams and Receive calls; use as a context manager."""
    return WsmanServer(
        certfile=certfile,
        keyfile=keyfile,
        username=username,
        password=password,
        registry=registry,
        stream_chunk=100,
        streams_per_receive=2,
    )
