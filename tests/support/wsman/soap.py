"""WS-Man SOAP envelopes as Windows writes them (docs: /work/shared/hyperv-facts.md section 4.2).

Requests are parsed with ElementTree by namespace, never by prefix: pywinrm's prefixes are its own choice.
"""

from __future__ import annotations

import base64
import contextlib
import math
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

S = "http://www.w3.org/2003/05/soap-envelope"
A = "http://schemas.xmlsoap.org/ws/2004/08/addressing"
W = "http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd"
P = "http://schemas.microsoft.com/wbem/wsman/1/wsman.xsd"
RSP = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell"
X = "http://schemas.xmlsoap.org/ws/2004/09/transfer"
F = "http://schemas.microsoft.com/wbem/wsman/1/wsmanfault"

SHELL_URI = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/cmd"
TRANSFER = "http://schemas.xmlsoap.org/ws/2004/09/transfer/"
SHELL_ACTION = RSP + "/"
CREATE = TRANSFER + "Create"
DELETE = TRANSFER + "Delete"
COMMAND = SHELL_ACTION + "Command"
SEND = SHELL_ACTION + "Send"
RECEIVE = SHELL_ACTION + "Receive"
SIGNAL = SHELL_ACTION + "Signal"
STATE_DONE = RSP + "/CommandState/Done"
STATE_RUNNING = RSP + "/CommandState/Running"
SIGNAL_TERMINATE = RSP + "/signal/terminate"
ANONYMOUS = "http://schemas.xmlsoap.org/ws/2004/08/addressing/role/anonymous"

# WSManFault codes Windows returns (hyperv-facts.md 4.2; pywinrm's test_exceptions.py).
CODE_TIMED_OUT = 2150858793
CODE_SCHEMA = 2150858817
CODE_SHELL_NOT_FOUND = 2150858843  # InvalidSelectors: the ShellId names no shell [from Windows captures]
CODE_ACTION_NOT_SUPPORTED = 2150858771


class BadRequest(Exception):
    """A request the stand-in refuses with a SOAP fault (Windows answers such requests with HTTP 500)."""

    def __init__(self, *, code: int, subcode: str, reason: str, sender: bool = True) -> None:
        super().__init__(reason)
        self.code = code
        self.subcode = subcode
        self.reason = reason
        self.sender = sender


@dataclass(frozen=True)
class Request:
    action: str
    message_id: str
    resource_uri: str
    shell_id: str | None
    operation_timeout: float
    options: dict[str, str]
    body: ET.Element


def _text(root: ET.Element, path: str) -> str:
    node = root.find(path, {"s": S, "a": A, "w": W})
    return (node.text or "").strip() if node is not None else ""


def parse_timeout(value: str) -> float:
    """An xs:duration of the form PTnS / PTn.nnnS (what pywinrm sends) in seconds."""
    seconds = math.nan
    if value.startswith("PT") and value.endswith("S"):
        with contextlib.suppress(ValueError):  # refused below with the other malformed durations
            seconds = float(value[2:-1])
    if not (math.isfinite(seconds) and seconds >= 0):
        raise BadRequest(code=CODE_SCHEMA, subcode="w:SchemaValidationError", reason=f"bad duration {value!r}")
    return seconds


def parse_request(data: bytes) -> Request:
    try:
        root = ET.fromstring(data)
    except ET.ParseError as e:
        raise BadRequest(code=CODE_SCHEMA, subcode="w:SchemaValidationError", reason=f"not XML: {e}") from None
    header = root.find(f"{{{S}}}Header")
    body = root.find(f"{{{S}}}Body")
    if root.tag != f"{{{S}}}Envelope" or header is None or body is None:
        raise BadRequest(code=CODE_SCHEMA, subcode="w:SchemaValidationError", reason="not a SOAP 1.2 envelope")
    message_id = _text(header, "a:MessageID")
    if not message_id:
        raise BadRequest(code=CODE_SCHEMA, subcode="w:SchemaValidationError", reason="no MessageID")
    selectors = {s.get("Name", ""): (s.text or "") for s in header.iter(f"{{{W}}}Selector")}
    options = {o.get("Name", ""): (o.text or "") for o in header.iter(f"{{{W}}}Option")}
    timeout = _text(header, "w:OperationTimeout")
    return Request(
        action=_text(header, "a:Action"),
        message_id=message_id,
        resource_uri=_text(header, "w:ResourceURI"),
        shell_id=selectors.get("ShellId"),
        operation_timeout=parse_timeout(timeout) if timeout else 60.0,
        options=options,
        body=body,
    )


def envelope(*, action: str, relates_to: str, body: str, shell_id: str | None = None) -> bytes:
    """A response envelope; RelatesTo echoes the client's MessageID string as real servers do."""
    selector = ""
    if shell_id is not None:
        selector = (
            f"<w:ResourceURI>{SHELL_URI}</w:ResourceURI>"
            f'<w:SelectorSet><w:Selector Name="ShellId">{escape(shell_id)}</w:Selector></w:SelectorSet>'
        )
    return (
        f'<s:Envelope xml:lang="en-US" xmlns:s="{S}" xmlns:a="{A}" xmlns:x="{X}" xmlns:w="{W}" '
        f'xmlns:rsp="{RSP}" xmlns:p="{P}">'
        f"<s:Header><a:Action>{action}</a:Action>"
        f"<a:MessageID>uuid:{str(uuid.uuid4()).upper()}</a:MessageID>"
        f"<a:To>{ANONYMOUS}</a:To><a:RelatesTo>{escape(relates_to)}</a:RelatesTo>{selector}"
        f"</s:Header><s:Body>{body}</s:Body></s:Envelope>"
    ).encode()


def fault(*, relates_to: str, error: BadRequest) -> bytes:
    """A WS-Man fault as Windows sends it with HTTP 500 (shape of pywinrm's test_exceptions.py captures)."""
    side = "s:Sender" if error.sender else "s:Receiver"
    reason = escape(error.reason)
    body = (
        f"<s:Fault><s:Code><s:Value>{side}</s:Value><s:Subcode><s:Value>{error.subcode}</s:Value></s:Subcode>"
        f'</s:Code><s:Reason><s:Text xml:lang="en-US">{reason}</s:Text></s:Reason>'
        f'<s:Detail><f:WSManFault xmlns:f="{F}" Code="{error.code}" Machine="standin">'
        f"<f:Message>{reason}</f:Message></f:WSManFault></s:Detail></s:Fault>"
    )
    return envelope(action="http://schemas.dmtf.org/wbem/wsman/1/wsman/fault", relates_to=relates_to, body=body)


def stream(name: str, command_id: str, data: bytes, *, end: bool = False) -> str:
    end_attr = ' End="true"' if end else ""
    text = base64.b64encode(data).decode("ascii")
    return f"<rsp:Stream Name={quoteattr(name)} CommandId={quoteattr(command_id)}{end_attr}>{text}</rsp:Stream>"
