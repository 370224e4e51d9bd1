"""What runs behind the stand-in's shells: recognised command lines and registered scripts, never PowerShell.

A command line is what cmd.exe would receive (`rsp:Command` plus each `rsp:Arguments`, space-separated). The only
program the stand-in knows is `powershell.exe -NoProfile -NonInteractive -Command -`, which reads its script from
stdin; the script's exact text selects a handler that tests register.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from xml.sax.saxutils import escape

POWERSHELL_STDIN = "powershell.exe -NoProfile -NonInteractive -Command -"
# cmd.exe's limit on one command line; with WINRS_SKIP_CMD_SHELL=TRUE, CreateProcess's (hyperv-facts.md 4.4).
CMD_LINE_LIMIT = 8191
CREATE_PROCESS_LIMIT = 32767
CMD_TOO_LONG = b"The command line is too long.\r\n"


def clixml_error(message: str) -> bytes:
    """PowerShell's stderr for an error record: `#< CLIXML` then `<S S="Error">` lines (hyperv-facts.md 4.3)."""
    lines = "".join(f'<S S="Error">{escape(line)}_x000D__x000A_</S>' for line in message.splitlines() or [""])
    objs = f'<Objs Version="1.1.0.1" xmlns="http://schemas.microsoft.com/powershell/2004/04">{lines}</Objs>'
    return b"#< CLIXML\r\n" + objs.encode("utf-8")


@dataclass(frozen=True)
class ScriptResult:
    stdout: bytes = b""
    stderr: bytes = b""
    exit_code: int = 0


@dataclass(frozen=True)
class ScriptCall:
    """One run of a script: its exact text, and the shell's environment (rsp:Environment in the Create
    message), where the package's scripts find their parameters."""

    script: str
    env: dict[str, str]


ScriptHandler = Callable[[ScriptCall], ScriptResult]


class ScriptRegistry:
    """Script handlers keyed by the script's exact text; thread-safe (the server runs one thread a request)."""

    def __init__(self) -> None:
        self._handlers: dict[str, ScriptHandler] = {}
        self._lock = threading.Lock()

    def register(self, script: str, handler: ScriptHandler) -> None:
        with self._lock:
            self._handlers[script] = handler

    def lookup(self, script: str) -> ScriptHandler | None:
        with self._lock:
            return self._handlers.get(script)


def _not_recognized(program: str) -> ScriptResult:
    # cmd.exe's own message and exit code for an unknown program; plain text, not CLIXML.
    text = f"'{program}' is not recognized as an internal or external command,\r\noperable program or batch file.\r\n"
    return ScriptResult(stderr=text.encode("cp437", "replace"), exit_code=9009)


class CommandRunner:
    """Decides what one command does: refused at once, or run on its stdin once stdin ends."""

    def __init__(self, registry: ScriptRegistry) -> None:
        self.registry = registry

    def check_command_line(self, line: str, *, skip_cmd_shell: bool) -> ScriptResult | None:
        """The immediate result of a command that never reads stdin, or None when it will run the script."""
        limit = CREATE_PROCESS_LIMIT if skip_cmd_shell else CMD_LINE_LIMIT
        if len(line) > limit:
            return ScriptResult(stderr=CMD_TOO_LONG, exit_code=1)
        if " ".join(line.split()).lower() != POWERSHELL_STDIN.lower():
            program = line.split(maxsplit=1)[0] if line.split() else line
            return _not_recognized(program)
        return None

    def run_script(self, script: str, env: dict[str, str] | None = None) -> ScriptResult:
        handler = self.registry.lookup(script)
        if handler is None:
            return ScriptResult(
                stderr=clixml_error("The WS-Management stand-in has no handler for this script."), exit_code=1
            )
        return handler(ScriptCall(script, dict(env or {})))
