"""The WinRM client the controller runs the package's PowerShell scripts on a Hyper-V host with.

The calling convention (docs/hyperv.md; the test stand-in follows it too) is fixed:

* one WinRS shell per script call, opened with code page 65001 (UTF-8) and the environment variable
  `VMREPL_PARAMS` = base64 of the UTF-8 JSON of the script's parameters model;
* the command is exactly `powershell.exe -NoProfile -NonInteractive -Command -` and the script
  (`scripts.text(name)`) goes over stdin, encoded UTF-8, with end=True. Not `run_ps`: that puts the
  script on the command line, which cmd.exe cuts at 8,191 characters, and parameters never enter the text;
* stdout is exactly one JSON envelope (envelope.py); stderr may hold CLIXML and is never a failure by
  itself: exit code 0 with an ok envelope is success, an error envelope is `HostError` whatever the exit
  code, anything else is `HostOutputError` (with the decoded stderr).

pywinrm is synchronous, so each call runs in a worker thread; each call builds its own `Protocol` (and
so its own HTTP session: NTLM authenticates a TCP connection, and a requests session is not shared
between threads safely).
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import functools
import ipaddress
import os
import ssl
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from prometheus_client import Histogram
from pydantic import BaseModel, SecretStr

from vmrepl.domain import MAX_WINRM_CALLS, MAX_WINRM_CALLS_PER_HOST
from vmrepl.errors import (
    ConfigError,
    DeadlineExceeded,
    HostAuthError,
    HostError,
    HostOutputError,
    HostTrustError,
    HostUnreachable,
    InvalidArgument,
)
from vmrepl.logs import get_logger
from vmrepl.providers.hyperv import scripts
from vmrepl.providers.hyperv.clixml import MAX_STDERR, stderr_message
from vmrepl.providers.hyperv.envelope import read_envelope

# Every script run against a host, by script and outcome ("ok", or the vmrepl error's class name).
SCRIPT_SECONDS = Histogram(
    "vmrepl_host_script_seconds",
    "Seconds a script took on a Hyper-V host over WinRM",
    ["script", "outcome"],
    buckets=(0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 900),
)

# pywinrm (and requests under it) is the controller's (its extra): imported where a host is called, so the
# agents, which import all of vmrepl, run without it (.ci/check-wheel).
if TYPE_CHECKING:
    from winrm.protocol import Protocol

log = get_logger("vmrepl.providers.hyperv.winrm")

COMMAND = "powershell.exe"
ARGUMENTS = ("-NoProfile", "-NonInteractive", "-Command", "-")
CODEPAGE_UTF8 = 65001
PARAMS_VARIABLE = "VMREPL_PARAMS"
# What a script may print on stdout before the call is refused (a host listing thousands of VMs prints a few MiB).
MAX_STDOUT = 64 * 1024 * 1024
# How much of stderr a debug log record carries.
LOG_STDERR_CHARS = 2000

Scheme = Literal["https", "http"]
Auth = Literal["ntlm", "kerberos", "credssp", "basic"]
_DEFAULT_PORTS = {"https": 5986, "http": 5985}
# Over plain HTTP only the authentications that can seal every message (MS-WSMV message encryption).
_HTTP_AUTHS = ("ntlm", "kerberos")


def _invalid(field_name: str, message: str) -> InvalidArgument:
    return InvalidArgument(f"winrm.{field_name}", message)


def _check_address(address: str) -> None:
    if not address or address != address.strip():
        raise InvalidArgument("address", "a host name or IP address is required (no spaces)")
    try:
        ipaddress.ip_address(address)
        return
    except ValueError:
        pass
    if any(c in address for c in "/:@?#[]\\") or len(address) > 253:
        raise InvalidArgument("address", f"{address!r} is not a host name or IP address (no scheme, port or path)")


@dataclass(frozen=True, kw_only=True)
class WinRmSettings:
    """How to reach one Hyper-V host's WinRM service. Empty strings and zeros mean the defaults, as in the API's
    `WinRmSettings` message: HTTPS on 5986 with the certificate validated, NTLM, 600 s per script.

    Refused: Basic or CredSSP over HTTP (Basic would send the password in clear; CredSSP is HTTPS-only
    here), a CA bundle for HTTP, and timeouts pywinrm cannot work with. Certificate validation is never off.
    """

    address: str
    username: str
    password: SecretStr = field(repr=False)
    scheme: Scheme | Literal[""] = "https"
    port: int = 0
    auth: Auth | Literal[""] = "ntlm"
    ca_bundle: str = ""  # a PEM file of CA certificates; "": the system's trust store
    script_timeout_seconds: int = 600
    # WS-Man OperationTimeout: how long the host holds a Receive open when a script prints nothing.
    operation_timeout_seconds: int = 20
    # How long the HTTP client waits for any reply; must exceed the operation timeout.
    read_timeout_seconds: int = 30

    def __post_init__(self) -> None:
        # Normalise the API's "unset" values here so a settings object always holds what will be used.
        if self.scheme == "":
            object.__setattr__(self, "scheme", "https")
        if self.auth == "":
            object.__setattr__(self, "auth", "ntlm")
        if self.port == 0:
            object.__setattr__(self, "port", _DEFAULT_PORTS.get(self.scheme, 0))
        if self.script_timeout_seconds == 0:
            object.__setattr__(self, "script_timeout_seconds", 600)
        self._validate()

    def _validate(self) -> None:
        _check_address(self.address)
        if not self.username:
            raise _invalid("username", "a user name is required")
        if self.scheme not in _DEFAULT_PORTS:
            raise _invalid("scheme", f"{self.scheme!r} is not https or http")
        if self.auth not in ("ntlm", "kerberos", "credssp", "basic"):
            raise _invalid("auth", f"{self.auth!r} is not ntlm, kerberos, credssp or basic")
        if self.scheme == "http" and self.auth not in _HTTP_AUTHS:
            raise _invalid(
                "auth",
                f"{self.auth} is allowed only over https; over http use ntlm or kerberos (messages are encrypted)",
            )
        if self.scheme == "http" and self.ca_bundle:
            raise _invalid("ca_bundle", "a CA bundle applies to https only")
        if not 1 <= self.port <= 65535:
            raise _invalid("port", f"{self.port} is not a TCP port")
        if not 1 <= self.script_timeout_seconds <= 86400:
            raise _invalid("script_timeout_seconds", "must be between 1 and 86400")
        if not 1 <= self.operation_timeout_seconds < self.read_timeout_seconds <= 3600:
            raise _invalid("read_timeout_seconds", "must exceed operation_timeout_seconds (both at least 1, <= 3600)")

    @property
    def endpoint(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address  # an IPv6 literal
        return f"{self.scheme}://{host}:{self.port}/wsman"

    def protocol_arguments(self) -> dict[str, Any]:
        """The keyword arguments of pywinrm's `Protocol` for these settings (the password included)."""
        https = self.scheme == "https"
        return {
            "endpoint": self.endpoint,
            "transport": self.auth,
            "username": self.username,
            # Kerberos authenticates with the controller's ticket for `username`, never a password.
            "password": None if self.auth == "kerberos" else self.password.get_secret_value(),
            "server_cert_validation": "validate",
            "ca_trust_path": (self.ca_bundle or _system_trust()) if https else None,
            # TLS protects HTTPS; over HTTP every message is sealed (NTLM/Kerberos), or nothing is sent.
            "message_encryption": "never" if https else "always",
            "send_cbt": True,
            "kerberos_delegation": False,
            "proxy": None,  # a host is reached directly, never through an environment's HTTP proxy
            "operation_timeout_sec": self.operation_timeout_seconds,
            "read_timeout_sec": self.read_timeout_seconds,
        }

    def protocol(self) -> Protocol:
        """A new pywinrm Protocol (no connection is made until the first message)."""
        from winrm.protocol import Protocol

        if self.ca_bundle and not os.path.isfile(self.ca_bundle):
            raise ConfigError(f"winrm.ca_bundle: {self.ca_bundle} is not a readable file")
        return Protocol(**self.protocol_arguments())


def _system_trust() -> str | None:
    """The system's CA file or directory (OpenSSL's defaults); None leaves requests to its own bundle."""
    paths = ssl.get_default_verify_paths()
    if paths.cafile and os.path.isfile(paths.cafile):
        return paths.cafile
    if paths.capath and os.path.isdir(paths.capath):
        return paths.capath
    return None


# The WinRM calls' own threads: a flood against slow hosts waits here, never in the default pool the rest of the
# controller's `asyncio.to_thread` calls use.
_WORKERS = ThreadPoolExecutor(max_workers=MAX_WINRM_CALLS, thread_name_prefix="vmrepl-winrm")
_SLOTS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Semaphore]] = weakref.WeakKeyDictionary()


def _host_slots(address: str) -> asyncio.Semaphore:
    """The bound on calls open at once to `address`, shared by every client of this event loop (one per
    process in the controller; tests run several loops)."""
    per_loop = _SLOTS.setdefault(asyncio.get_running_loop(), {})
    return per_loop.setdefault(address.casefold(), asyncio.Semaphore(MAX_WINRM_CALLS_PER_HOST))


class _Abandoned(Exception):
    """The caller was cancelled: the worker stops receiving, terminates the command and closes the shell."""


@dataclass(frozen=True, slots=True)
class _Output:
    stdout: bytes
    stderr: bytes
    exit_code: int


def encode_params(params: BaseModel) -> str:
    """VMREPL_PARAMS: base64 of the UTF-8 JSON of the parameters (ASCII, so no code page can mangle it)."""
    return base64.b64encode(params.model_dump_json().encode("utf-8")).decode("ascii")


class HostClient:
    """Runs the package's scripts on one Hyper-V host over WinRM; one shell per call, calls may overlap."""

    def __init__(self, settings: WinRmSettings) -> None:
        self.settings = settings
        self._log = log.bind(host=settings.address)

    async def run(self, name: str, params: BaseModel) -> Any:
        """The validated result of script `name` run with `params`.

        Raises HostError (the script's error envelope), HostOutputError, HostUnreachable, HostTrustError,
        HostAuthError, DeadlineExceeded (past script_timeout_seconds), InvalidArgument (a wrong params type).
        """
        script = scripts.SCRIPTS.get(name)
        if script is None:
            raise InvalidArgument("script", f"{name!r} is not a script the package ships")
        if type(params) is not script.params:
            raise InvalidArgument("params", f"{name} takes {script.params.__name__}, not {type(params).__name__}")
        stdin = scripts.text(name).encode("utf-8")
        env = {PARAMS_VARIABLE: encode_params(params)}
        stop = threading.Event()
        slots = _host_slots(self.settings.address)
        await slots.acquire()
        started, outcome = time.monotonic(), "ok"
        try:
            call = functools.partial(contextvars.copy_context().run, self._call, name, stdin, env, stop)
            task = asyncio.get_running_loop().run_in_executor(_WORKERS, call)
        except BaseException:
            slots.release()
            raise
        # The slot is free when the thread ends, not when a cancelled caller stops waiting for it.
        task.add_done_callback(lambda _: slots.release())
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            # The thread cannot be interrupted mid-request: tell it to stop at its next Receive, and let
            # it terminate the command and close the shell on its own.
            stop.set()
            task.add_done_callback(_drain)
            outcome = "cancelled"
            raise
        except Exception as e:
            outcome = type(e).__name__
            raise
        finally:
            SCRIPT_SECONDS.labels(name, outcome).observe(time.monotonic() - started)

    def _result(self, name: str, output: _Output) -> Any:
        logger = self._log.bind(script=name, exit_code=output.exit_code)
        if output.stderr:
            logger.debug("script_stderr", stderr=stderr_message(output.stderr)[:LOG_STDERR_CHARS])
        try:
            result = read_envelope(output.stdout, scripts.SCRIPTS[name].result)
        except HostError as e:
            logger.info("script_failed", operation=e.operation, code=e.code, message=e.description)
            raise
        except HostOutputError as e:
            message = f"{self.settings.address}: script {name} exited with code {output.exit_code}: {e}"
            stderr = stderr_message(output.stderr).strip()
            if stderr:
                message += f"; stderr: {stderr[:LOG_STDERR_CHARS]}"
            logger.warning("script_output_refused", error=str(e))
            raise HostOutputError(message) from e
        if output.exit_code != 0:
            raise HostOutputError(
                f"{self.settings.address}: script {name} printed a result but exited with code {output.exit_code}"
            )
        logger.debug("script_done")
        return result

    # ---- the worker thread ---------------------------------------------------------------------------

    def _call(self, name: str, stdin: bytes, env: dict[str, str], stop: threading.Event) -> Any:
        try:
            output = self._shell_call(name, stdin, env, stop)
        except (HostError, HostOutputError, DeadlineExceeded, ConfigError, _Abandoned):
            raise
        except Exception as e:
            raise self._transport_error(e) from e
        # Parsed and validated here, in the worker thread: up to MAX_STDOUT of a host's JSON never holds the
        # controller's event loop.
        return self._result(name, output)

    def _shell_call(self, name: str, stdin: bytes, env: dict[str, str], stop: threading.Event) -> _Output:
        protocol = self.settings.protocol()
        try:
            shell_id = protocol.open_shell(codepage=CODEPAGE_UTF8, noprofile=True, env_vars=env)
            try:
                command_id = protocol.run_command(shell_id, COMMAND, ARGUMENTS)
                try:
                    protocol.send_command_input(shell_id, command_id, stdin, end=True)
                    return self._receive(protocol, shell_id, command_id, name, stop)
                finally:
                    self._quietly("terminate_failed", protocol.cleanup_command, shell_id, command_id)
            finally:
                self._quietly("close_shell_failed", protocol.close_shell, shell_id, close_session=False)
        finally:
            protocol.transport.close_session()

    def _receive(self, protocol: Protocol, shell_id: str, command_id: str, name: str, stop: threading.Event) -> _Output:
        from winrm.exceptions import WinRMOperationTimeoutError

        deadline = time.monotonic() + self.settings.script_timeout_seconds
        stdout, stderr = bytearray(), bytearray()
        while True:
            if stop.is_set():
                raise _Abandoned()
            if time.monotonic() >= deadline:
                raise DeadlineExceeded(
                    f"{self.settings.address}: script {name} did not finish within "
                    f"{self.settings.script_timeout_seconds} s (winrm.script_timeout_seconds)"
                )
            try:
                out, err, exit_code, done = protocol.get_command_output_raw(shell_id, command_id)
            except WinRMOperationTimeoutError:
                continue  # the host held the Receive for OperationTimeout with nothing to say: ask again
            stdout += out
            if len(stderr) < MAX_STDERR:
                stderr += err[: MAX_STDERR - len(stderr)]
            if len(stdout) > MAX_STDOUT:
                raise HostOutputError(
                    f"{self.settings.address}: script {name} printed more than {MAX_STDOUT} bytes on stdout"
                )
            if done:
                return _Output(bytes(stdout), bytes(stderr), exit_code)

    def _quietly(self, event: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        # Terminating the command and deleting the shell are best effort: the result (or the error being
        # raised) is what the caller needs; a shell left behind expires on the host's idle timeout.
        try:
            fn(*args, **kwargs)
        except Exception as e:  # pywinrm asserts RelatesTo, so AssertionError too
            self._log.warning(event, error=f"{type(e).__name__}: {e}")

    def _untrusted(self, e: BaseException) -> str:
        """Why the host's certificate was refused, with the fix: another name than the address, or a CA the
        trust store does not hold."""
        host = self.settings.address
        if _name_mismatch(e):
            return (
                f"{host}: the WinRM certificate is not issued for {host!r}: give the host the address its "
                f"certificate names (vmrepl infra host-update --address) ({_reason(e)})"
            )
        where = f"the CA bundle {self.settings.ca_bundle}" if self.settings.ca_bundle else "the system's trust store"
        return (
            f"{host}: the WinRM certificate is not trusted by {where}: set the host's CA bundle to the CA that "
            f"issued it (vmrepl infra host-update --winrm-ca-bundle) ({_reason(e)})"
        )

    def _transport_error(self, e: Exception) -> Exception:
        import requests
        from winrm.exceptions import (
            InvalidCredentialsError,
            WinRMError,
            WinRMTransportError,
            WSManFaultError,
        )

        host, user = self.settings.address, self.settings.username
        if isinstance(e, InvalidCredentialsError):
            return HostAuthError(
                f"{host}: WinRM refused the credentials of the user {user} ({self.settings.auth}); check the host's "
                "credential, and that the account may use WinRM on the host"
            )
        if isinstance(e, requests.exceptions.SSLError):
            if _certificate_rejected(e):
                return HostTrustError(self._untrusted(e))
            return HostUnreachable(f"{host}: TLS with the WinRM service failed: {_reason(e)}")
        if isinstance(e, requests.exceptions.Timeout):
            return HostUnreachable(f"{host}: WinRM did not answer in time ({type(e).__name__})")
        if isinstance(e, requests.exceptions.RequestException):
            return HostUnreachable(f"{host}:{self.settings.port}: cannot reach WinRM: {_reason(e)}")
        if isinstance(e, WSManFaultError):
            code = e.wsman_fault_code if e.wsman_fault_code is not None else e.wmierror_code
            return HostError(host=host, operation="WS-Management", message=f"fault: {e.reason}", code=code)
        if isinstance(e, WinRMTransportError):
            return HostError(host=host, operation="WS-Management", message=f"HTTP {e.code} from WinRM", code=None)
        if isinstance(e, WinRMError):
            return HostError(host=host, operation="WinRM", message=str(e), code=None)
        return HostOutputError(f"{host}: unexpected WinRM failure: {type(e).__name__}: {e}")


def _name_mismatch(e: BaseException) -> bool:
    text = repr(e)
    return "Hostname mismatch" in text or "doesn't match" in text or "IP address mismatch" in text


def _certificate_rejected(e: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = e
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(current):
            return True
        nested = current.args[0] if current.args and isinstance(current.args[0], BaseException) else None
        current = current.__cause__ or current.__context__ or nested
    return False


def _reason(e: BaseException) -> str:
    # requests nests urllib3's errors; their innermost text is the useful part, without the URL noise.
    text = str(e)
    return text if len(text) <= 300 else text[:300] + "..."


def _drain(task: asyncio.Future[Any]) -> None:
    # A call abandoned by a cancelled caller still ends (stopped at its next Receive); its outcome is
    # retrieved so asyncio never reports "exception was never retrieved".
    if not task.cancelled():
        task.exception()
