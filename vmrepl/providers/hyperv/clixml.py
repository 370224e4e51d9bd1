"""Decode the CLIXML that powershell.exe leaves on stderr into plain message lines.

Over WinRM, stderr of `powershell.exe -Command -` is `#< CLIXML\\r\\n` and then `<Objs ...>` holding
`<S S="Error">text_x000D__x000A_</S>` nodes (error, warning, verbose... lines) and `<Obj S="progress">`
records. pywinrm's `Protocol._clean_error_msg` keeps the text of every `<S>` node and turns
`_x000D__x000A_` into a newline; this does the same, keeps the stream's name, drops progress records,
and never raises: stderr is never failure by itself (the exit code and the stdout envelope decide), so
malformed or hostile XML falls back to the raw text, decoded leniently.

The XML comes from the host, so a DTD or entity declaration is refused before parsing (no entity
expansion, no external entities); the stdlib parser then only sees plain elements.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

_HEADER = "#< CLIXML"
_NS = "{http://schemas.microsoft.com/powershell/2004/04}"
# CLIXML escapes characters XML cannot carry as _xHHHH_ (a literal underscore before x is _x005F_).
_ESCAPE = re.compile(r"_x([0-9A-Fa-f]{4})_")
MAX_STDERR = 4 * 1024 * 1024  # what a script may leave on stderr before the rest is dropped unread


@dataclass(frozen=True, slots=True)
class StderrLine:
    stream: str  # "Error", "warning", "verbose", ... as the <S S="..."> attribute says; "" for raw text
    text: str


def _unescape(text: str) -> str:
    def one(m: re.Match[str]) -> str:
        code = int(m.group(1), 16)
        # A lone surrogate half cannot be a str character on its own; keep the escape as text.
        return m.group(0) if 0xD800 <= code <= 0xDFFF else chr(code)

    return _ESCAPE.sub(one, text)


def _raw_lines(text: str) -> list[StderrLine]:
    return [StderrLine("", line) for line in text.splitlines() if line.strip()]


def decode_stderr(data: bytes | str) -> list[StderrLine]:
    """The message lines in a script's stderr: CLIXML decoded, plain text split into lines, never an error."""
    # Lenient decoding: stderr only feeds messages, so a bad byte must not hide the rest of them.
    text = data[:MAX_STDERR].decode("utf-8", errors="replace") if isinstance(data, bytes) else data[:MAX_STDERR]
    text = text.lstrip("\ufeff")
    if not text.startswith(_HEADER):
        return _raw_lines(text)
    body = text[len(_HEADER) :].lstrip("\r\n")
    if "<!" in body:  # a DTD, an entity or a CDATA section: never in real CLIXML, refused unparsed
        return _raw_lines(text)
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return _raw_lines(text)
    lines: list[StderrLine] = []
    for node in root:  # only top-level <S> are stream lines; an <S> inside an <Obj> is a property
        if node.tag not in (f"{_NS}S", "S") or node.text is None:
            continue
        message = _unescape(node.text)
        for line in message.splitlines():
            if line.strip():
                lines.append(StderrLine(node.get("S", ""), line.rstrip()))
    return lines


def stderr_message(data: bytes | str) -> str:
    """The stderr lines as one text, for a log record or an error message."""
    return "\n".join(line.text for line in decode_stderr(data))
