"""A WS-Management stand-in that the unmodified pywinrm client talks to (see docs/hyperv.md)."""

from tests.support.wsman.runner import (
    CMD_LINE_LIMIT,
    POWERSHELL_STDIN,
    CommandRunner,
    ScriptCall,
    ScriptRegistry,
    ScriptResult,
    clixml_error,
)
from tests.support.wsman.server import WsmanServer, https_standin

__all__ = [
    "CMD_LINE_LIMIT",
    "POWERSHELL_STDIN",
    "CommandRunner",
    "ScriptCall",
    "ScriptRegistry",
    "ScriptResult",
    "WsmanServer",
    "clixml_error",
    "https_standin",
]
