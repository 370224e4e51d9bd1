"""What every command group shares: the connection, one API call with its error handling, and output."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import grpc
import typer
from google.protobuf import json_format, timestamp_pb2
from google.protobuf.message import Message
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from vmrepl.config import TlsSettings
from vmrepl.errors import VmreplError
from vmrepl.security.tls import channel_credentials
from vmrepl.v1 import controller_pb2 as api
from vmrepl.v1 import controller_pb2_grpc

out = Console()
err = Console(stderr=True)
T = TypeVar("T")
STATE_NAMES = {v: k.removeprefix("SESSION_STATE_").lower() for k, v in api.SessionState.items()}
DISK_STATE_NAMES = {v: k.removeprefix("DISK_TASK_STATE_").lower() for k, v in api.DiskTaskState.items()}
EXIT_FAILED, EXIT_USAGE, EXIT_INCOMPLETE = 1, 2, 3


class Conn:
    controller: str = "127.0.0.1:7400"
    certs_dir: Path = Path("certs")
    identity: str = "operator"
    _stub: Any = None

    def stub(self) -> Any:
        if self._stub is None:
            d = self.certs_dir
            tls = TlsSettings(
                ca_file=d / "ca.pem", cert_file=d / f"{self.identity}.pem", key_file=d / f"{self.identity}.key"
            )
            try:
                credentials = channel_credentials(tls)
            except VmreplError as e:  # a new user's first command, run where no certs/ folder is: one line
                err.print(f"[red]error[/red]: {e} (--certs-dir names the folder with ca.pem and IDENTITY.pem/.key)")
                raise typer.Exit(EXIT_USAGE) from None
            channel = grpc.secure_channel(self.controller, credentials)
            self._stub = controller_pb2_grpc.ControllerServiceStub(channel)
        return self._stub


conn = Conn()
JsonOpt = Annotated[bool, typer.Option("--json", help="print the API's reply as JSON")]


def call(fn: Callable[..., T], request: Message) -> T:
    """One API call; a gRPC error becomes a one-line message and exit status 1."""
    try:
        return fn(request, timeout=60)
    except grpc.RpcError as e:
        err.print(f"[red]error[/red]: {e.code().name}: {shown(e.details())}")  # type: ignore[attr-defined]
        raise typer.Exit(EXIT_FAILED) from None


def as_json(msg: Message) -> None:
    print(json.dumps(json_format.MessageToDict(msg, preserving_proto_field_name=True), indent=2))


# Control characters but tab and newline: an escape sequence or a carriage return in a host's VM name or
# message would otherwise reach the terminal (retitle it, clear it, overwrite a line).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def plain(value: object) -> str:
    """A value from outside (a host's VM names and messages, errors) with its control characters shown as
    `\\x1b`, never acted on."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(value))


def shown(value: object) -> str:
    """A value from outside, for an f-string printed with markup: `plain`, and `[...]` is text, not a style
    (a VM named `db[/]` would fail the print, `web [prod]` would print as `web `)."""
    return escape(plain(value))


def table(title: str, columns: list[str], rows: list[list[object]]) -> None:
    # Cells and titles are Text: never markup, whatever a host named its VMs.
    t = Table(title=Text(plain(title)))
    whole = _first_fits(columns, rows, out.width)
    for i, c in enumerate(columns):
        # fold, never "…": a cut name cannot be copied, a cut outcome says nothing. The first column names
        # the row (a session, a restore point): kept on one line wherever the others can still show their
        # headings' words, since a name folded over two lines is copied as two and refused by the next command.
        first = i == 0 and whole
        t.add_column(c, overflow="fold", no_wrap=first, min_width=_longest(rows, 0) if first else None)
    for r in rows:
        t.add_row(*(Text(plain(v)) for v in r))
    out.print(t)


def _longest(rows: list[list[object]], column: int) -> int:
    return max((len(str(r[column])) for r in rows if r), default=0)


def _first_fits(columns: list[str], rows: list[list[object]], width: int) -> bool:
    """Whether the first column's longest value fits on one line with every other column still as wide as
    its heading's longest word (and the borders, 3 characters a column): in a narrower terminal the other
    columns would be squeezed to fragments, and the first one folds as the others do."""
    others = sum(max((len(w) for w in c.split()), default=1) for c in columns[1:])
    return _longest(rows, 0) + others + 3 * len(columns) + 1 <= width


def cell_time(ts: timestamp_pb2.Timestamp) -> str:
    """A time in a table cell, UTC to the second: a space, not ISO's `T`, between date and time, so a
    narrow column folds there (`2026-11-30` over `23:06:01`) rather than cutting the seconds off."""
    return ts.ToDatetime().isoformat(sep=" ", timespec="seconds") if ts.seconds or ts.nanos else ""


def mib(n: int) -> str:
    return f"{n / (1 << 20):,.1f} MiB"
